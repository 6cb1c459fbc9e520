import numpy as np
import pytest
import torch

from ldmkit.data import shapes
from ldmkit.data.shapes import (HELDOUT_OBJECTS, HELDOUT_TRIPLES, Obj, ShapesDataset, Spec, all_prompts,
                                all_specs, caption, collate, heldout_prompts, parse_caption, render,
                                train_prompts)


def test_dataset_is_deterministic_and_seeded():
    a = ShapesDataset("train", size=32, length=20, seed=3)
    b = ShapesDataset("train", size=32, length=20, seed=3)
    c = ShapesDataset("train", size=32, length=20, seed=4)
    for i in (0, 7, 19):
        x, y = a[i], b[i]
        assert x["caption"] == y["caption"] and x["spec"] == y["spec"]
        assert torch.equal(x["image"], y["image"])
    assert any(a[i]["caption"] != c[i]["caption"] or not torch.equal(a[i]["image"], c[i]["image"])
               for i in range(5))
    # random access order does not matter
    assert torch.equal(a[5]["image"], ShapesDataset("train", size=32, length=20, seed=3)[5]["image"])


@pytest.mark.parametrize("size", [32, 64])
def test_item_format(size):
    ds = ShapesDataset("heldout", size=size, length=8, seed=0)
    item = ds[2]
    assert item["image"].shape == (3, size, size) and item["image"].dtype == torch.float32
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    assert item["image"].max() == 1  # white background
    assert all_prompts()[item["label"]] == item["caption"]
    assert parse_caption(item["caption"]) == item["spec"]
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, size, size) and len(batch["caption"]) == 4
    assert batch["label"].dtype == torch.long


def test_split_has_no_leakage_and_covers_everything():
    train, held = set(train_prompts()), set(heldout_prompts())
    assert train and held and not (train & held)
    assert train | held == set(all_prompts())
    for text in train:
        spec = parse_caption(text)
        assert not any((o.colour, o.shape) in HELDOUT_OBJECTS for o in spec.objects), text
        assert spec.triple not in HELDOUT_TRIPLES, text
    # the held-out set really contains each held-out ingredient
    held_specs = [parse_caption(t) for t in held]
    for colour, shape in HELDOUT_OBJECTS:
        assert Spec((Obj(colour, shape),)) in held_specs
    for triple in HELDOUT_TRIPLES:
        assert any(s.triple == triple for s in held_specs)
    # samples drawn by the data set respect the split
    ds_train = ShapesDataset("train", length=300, seed=0)
    ds_held = ShapesDataset("heldout", length=300, seed=0)
    assert all(caption(ds_train.spec_at(i)[0]) in train for i in range(300))
    assert all(caption(ds_held.spec_at(i)[0]) in held for i in range(300))
    # both single- and two-object captions are drawn
    n_single = sum(len(ds_train.spec_at(i)[0].objects) == 1 for i in range(300))
    assert 40 < n_single < 140  # p_single = 0.3


def test_captions_parse_back():
    specs = all_specs()
    assert len(specs) == len(set(specs)) == 12 + 12 * 11 * 4
    for spec in specs:
        assert parse_caption(caption(spec)) == spec
    assert parse_caption("  A Blue Triangle   above a red circle. ") == Spec(
        (Obj("blue", "triangle"), Obj("red", "circle")), "above")
    for bad in ["a purple circle", "a red hexagon", "a red circle near a blue square", "", "red circle",
                "a red circle above a red circle"]:
        with pytest.raises(ValueError):
            parse_caption(bad)


@pytest.mark.parametrize("size", [32, 64])
def test_layout_is_unambiguous(size):
    rng = np.random.default_rng(0)
    pairs = [s for s in all_specs() if s.relation is not None]
    for k in range(200):
        spec = pairs[int(rng.integers(len(pairs)))]
        img, boxes = render(spec, size, rng, return_layout=True)
        assert img.size == (size, size)
        for x0, y0, x1, y1 in boxes:
            assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
        (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = boxes
        # boxes do not overlap
        assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0
        dx = (bx0 + bx1 - ax0 - ax1) / 2
        dy = (by0 + by1 - ay0 - ay1) / 2
        along, across = {"to the left of": (dx, dy), "to the right of": (-dx, dy),
                         "above": (dy, dx), "below": (-dy, dx)}[spec.relation]
        assert along > 0 and abs(across) <= 0.5 * along + 1e-9


def test_render_draws_the_palette_colours():
    spec = Spec((Obj("blue", "square"),))
    img = np.asarray(render(spec, 64, 0))
    colours = {tuple(c) for c in img.reshape(-1, 3)}
    assert shapes.COLOURS["blue"] in colours and shapes.BACKGROUND in colours


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="split"):
        ShapesDataset("val")
    with pytest.raises(ValueError, match="size"):
        ShapesDataset(size=8)
    with pytest.raises(ValueError, match="length"):
        ShapesDataset(length=0)
    with pytest.raises(ValueError, match="colour"):
        Obj("purple", "circle")
    with pytest.raises(ValueError, match="relation"):
        Spec((Obj("red", "circle"), Obj("blue", "circle")), "near")
    with pytest.raises(IndexError):
        ShapesDataset(length=3)[3]


def test_forward_caption_names_the_left_or_upper_object_first_and_never_leaks_heldout():
    from ldmkit.data.shapes import (caption, converse, forward_caption, heldout_prompts, parse_caption,
                                    split_specs)

    assert forward_caption("a blue square below a red circle") == "a red circle above a blue square"
    assert forward_caption("a red circle to the right of a blue triangle") == \
        "a blue triangle to the left of a red circle"
    assert forward_caption("a red circle above a blue square") == "a red circle above a blue square"
    assert forward_caption("a green circle") == "a green circle"
    # converse phrasing that is held out ((square, left of, circle)) keeps the caption as it is
    assert forward_caption("a red circle to the right of a blue square") == \
        "a red circle to the right of a blue square"
    held = set(heldout_prompts())
    for spec in split_specs("train"):
        text = caption(spec)
        out = forward_caption(text)
        assert out not in held
        new = parse_caption(out)
        assert new in (spec, converse(spec))  # the same scene
        if out != text:
            assert new.relation in ("to the left of", "above")
