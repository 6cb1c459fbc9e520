"""`ldm serve`: an HTTP API in AUTOMATIC1111's shape and a web page, over models kept loaded.

    commands.py   the `ldm serve` command: flags, the safety checks before anything loads, uvicorn
    models.py     the loaded models (kept warm), and the LoRA / ControlNet folders, by name only
    jobs.py       the queue: one generation at a time per device, positions, progress, previews, cancelling
    requests.py   the request bodies (A1111's fields that ldmkit supports) and their limits
    generate.py   one request as a pipeline call: seeds, sampler, LoRAs, ControlNets, PNGs, the response
    app.py        the FastAPI app: the generation and job routes, errors as HTTP 4xx
    info.py       the routes that describe the server: samplers, models, options, PNG settings
    guards.py     API key, Host / Origin checks, the request body limit
    static/       the page (plain HTML + JS, no build step)

See docs/serve.md.
"""
