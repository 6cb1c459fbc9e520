"""A1111's prompt syntax (conditioning/prompt_syntax.py): the parser against A1111's own examples,
75-token chunks, BREAK, the comma backtrack, the weighting (mean kept per chunk), and the encoders
and pipelines that use it -- on the random tiny SD 1.5 of the interop tests (CPU, seconds)."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

from ldmkit.conditioning.prompt_syntax import (BREAK, chunk_tokens, emphasize, is_plain, parse_prompt_attention,
                                               same_length, stack_rows)
from ldmkit.conditioning.base import Conditioning

sys.path.insert(0, str(Path(__file__).parent))

# (prompt, A1111's parse_prompt_attention result): the examples of its docstring, then more of its rules
A1111_TABLE = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    ("", [("", 1.0)]),
    ("[a]", [("a", 1 / 1.1)]),
    ("[[a]]", [("a", 1 / 1.1 / 1.1)]),
    ("((a))", [("a", 1.1 * 1.1)]),
    ("(a:0.5) b", [("a", 0.5), (" b", 1.0)]),
    ("(a [b]:1.5)", [("a ", 1.5), ("b", 1.5 / 1.1)]),
    ("a) b]", [("a) b]", 1.0)]),  # closing brackets that close nothing are text
    ("a:1.2) b", [("a:1.2) b", 1.0)]),  # a weight without an open bracket is text
    ("(a: 1.2)", [("a: 1.2", 1.1)]),  # no space allowed before the weight (A1111's regex)
    ("a \\\\ b", [("a \\ b", 1.0)]),
    ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),
    ("aBREAKb BREAKs", [("aBREAKb BREAKs", 1.0)]),  # BREAK only as a word of its own
    ("(a BREAK b)", [("a", 1.1), BREAK, ("b", 1.1)]),
]


@pytest.mark.parametrize("prompt,expected", A1111_TABLE, ids=[p or "<empty>" for p, _ in A1111_TABLE])
def test_parse_matches_a1111(prompt, expected):
    assert parse_prompt_attention(prompt) == expected


def test_plain_prompts_are_recognised():
    assert is_plain("a red circle, above a blue square: big") and is_plain("")
    assert not any(map(is_plain, ["(a)", "[a]", "a BREAK b", "\\(a"]))


def test_chunks_of_75_break_and_comma_backtrack():
    ids = list(range(200))
    chunks = chunk_tokens([("x", 1.0)], [ids])
    assert [len(c[0]) for c in chunks] == [75, 75, 50] and sum((c[0] for c in chunks), []) == ids
    chunks = chunk_tokens([("a", 1.0), BREAK, ("b", 2.0)], [[1, 2], [], [3]])
    assert chunks == [([1, 2], [1.0, 1.0]), ([3], [2.0])]
    assert chunk_tokens([("", 1.0)], [[]]) == [([], [])]
    assert chunk_tokens([("", 1.0), BREAK, ("a", 1.0)], [[], [], [5]]) == [([], []), ([5], [1.0])]
    # a full chunk hands the words after its last comma (id 9, at most 20 back) to the next one
    body = [1] * 70 + [9] + [2] * 4 + [3] * 5
    first, second = chunk_tokens([("x", 1.0)], [body], comma=9)
    assert first[0] == [1] * 70 + [9] and second[0] == [2] * 4 + [3] * 5
    far = [1] * 50 + [9] + [2] * 24 + [3] * 5  # the comma is 24 back: no backtrack
    assert [len(c[0]) for c in chunk_tokens([("x", 1.0)], [far], comma=9)] == [75, 5]


def test_emphasis_keeps_each_chunks_mean():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 77, 16, generator=g) + 0.3
    w = torch.ones(2, 77)
    w[0, 5], w[1, 7:9] = 1.5, 0.5
    out = emphasize(z, w)
    torch.testing.assert_close(out.mean(dim=(1, 2)), z.mean(dim=(1, 2)), rtol=1e-5, atol=1e-6)
    ratio = out / z
    torch.testing.assert_close(ratio[0, 5] / ratio[0, 4], torch.full((16,), 1.5), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ratio[1, 7] / ratio[1, 6], torch.full((16,), 0.5), rtol=1e-4, atol=1e-4)
    assert emphasize(z, torch.ones(2, 77)) is z  # all weights 1: untouched, bit for bit


@pytest.fixture(scope="module")
def sd(tmp_path_factory, one_thread):
    """The tiny random SD 1.5 of the interop tests, saved by diffusers and loaded by ldmkit."""
    pytest.importorskip("diffusers")
    import interop_models as im

    from ldmkit.pipelines import load

    folder = tmp_path_factory.mktemp("sd1") / "model"
    im.build_pipeline("sd1", "ddim", workdir=folder.parent).save_pretrained(folder)
    return load(folder, device="cpu", dtype=torch.float32)


WORDS = "the cat on red".split()


def _words(n: int) -> str:
    return " ".join(WORDS[i % 4] for i in range(n))  # one token each in the tiny vocabulary


def test_clip_plain_prompts_are_unchanged_and_weights_change_them(sd):
    enc = sd.conditioner
    plain = "the red cat on the cat"
    base = enc.encode([plain]).context
    assert torch.equal(enc.encode([plain], syntax=True).context, base)
    assert torch.equal(enc.encode(["\\(the\\) cat"], syntax=True).context, enc.encode(["(the) cat"]).context)
    weighted = enc.encode(["the red (cat:1.5) on the cat"], syntax=True).context
    assert weighted.shape == base.shape and not torch.equal(weighted, base)
    assert abs(float(weighted.mean() - base.mean())) < 1e-5  # the chunk's mean is kept
    down = enc.encode(["[the red cat on the cat]"], syntax=True).context
    assert not torch.equal(down, base) and not torch.equal(down, weighted)


def test_clip_long_prompt_in_chunks_and_break(sd):
    enc = sd.conditioner
    long = _words(200)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # chunks, not truncation: no warning
        ctx = enc.encode([long], syntax=True).context
    assert ctx.shape[1] == 3 * 77
    first = enc.encode([_words(75)]).context  # the first chunk alone is a plain 75-token prompt
    torch.testing.assert_close(ctx[:, :77], first, rtol=0, atol=1e-6)
    assert enc.encode(["the cat BREAK red"], syntax=True).context.shape[1] == 2 * 77
    # a batch of prompts of different lengths: padded under a mask, each row its own
    batch = enc.encode(["the cat", long], syntax=True)
    assert batch.context.shape[1] == 231 and batch.mask is not None and not batch.mask[0, 77:].any()
    torch.testing.assert_close(batch.context[1:], ctx, rtol=0, atol=1e-6)


def test_masked_padding_changes_nothing_in_the_unet(sd):
    enc, unet = sd.conditioner, sd.denoiser
    short, long = enc.encode(["the cat"], syntax=True), enc.encode([_words(100)], syntax=True)
    a, b = same_length(short, long)
    assert a.context.shape == b.context.shape == (1, 154, short.context.shape[2])
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([500])
    with torch.no_grad():
        alone = unet(x, t, context=short.context)
        padded = unet(x, t, context=a.context, context_mask=a.mask)
    torch.testing.assert_close(padded, alone, rtol=1e-4, atol=1e-5)


def test_pipeline_reads_the_syntax(sd):
    kw = dict(seed=3, steps=2, sampler="ddim", progress=False)
    plain = sd.text2img("the red cat", **kw)[0].image
    assert sd.text2img("\\the red cat", **kw)[0].image.tobytes() == plain.tobytes()  # a lone backslash is dropped
    weighted = sd.text2img("the (red:1.6) cat", **kw)[0]
    assert weighted.image.tobytes() != plain.tobytes() and weighted.metadata["prompt"] == "the (red:1.6) cat"
    long = sd.text2img(_words(150), negative_prompt="the cat", **kw)[0]  # cond 2 chunks, uncond 1
    assert long.image.size == plain.size


def test_word_level_encoder_strips_the_syntax_and_weights():
    from ldmkit.conditioning import TransformerTextEncoder

    torch.manual_seed(0)
    enc = TransformerTextEncoder.from_captions(["a red square", "a blue circle"], width=16, depth=1, heads=2,
                                               max_length=8, normalize=True).eval()
    with torch.no_grad():
        base = enc.encode(["a red square"]).context
        assert torch.equal(enc.encode(["a red square"], syntax=True).context, base)
        same_words = enc.encode(["a (red) square"], syntax=False).context  # normalisation drops the brackets
        weighted = enc.encode(["a (red) square"], syntax=True).context
        assert torch.equal(same_words, base) and not torch.equal(weighted, base)
        torch.testing.assert_close(weighted.mean(), base.mean(), rtol=1e-5, atol=1e-6)
        ratio = weighted[0, 2] / base[0, 2] / (weighted[0, 1] / base[0, 1])  # token 2 is "red" after [BOS] a
        torch.testing.assert_close(ratio, torch.full_like(ratio, 1.1), rtol=1e-4, atol=1e-4)
        with pytest.warns(UserWarning, match="truncated"):
            assert enc.encode(["(a red square a red square a red)"], syntax=True).context.shape[1] == 8


def test_stack_rows_pads_under_a_mask():
    a = Conditioning(context=torch.ones(1, 3, 2))
    b = Conditioning(context=torch.full((1, 5, 2), 2.0))
    s = stack_rows([a, b])
    assert s.context.shape == (2, 5, 2) and s.mask.tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    assert stack_rows([a, a]).mask is None
