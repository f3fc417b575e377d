"""Steered generation on the fabric: make a Rome prompt continue as if it were about Paris.

A session (one job, no round trip): the first trace reads the Eiffel Tower prompt's
last-token state at a late layer; the generation writes it into the Colosseum prompt at the
first step only, and the model carries the edit through the steps that follow.

    NNFABRIC_URL=... NNFABRIC_API_KEY=... python examples/steering.py
"""

import os

import nnfabric

fabric = nnfabric.connect()
model = fabric.model(os.environ.get("NNFABRIC_MODEL", "smollm2"))

SOURCE = "The Eiffel Tower is in the city of"
PROMPT = "The Colosseum is in the city of"
LAYER, STEPS = 27, 8
layer = model.model.layers[LAYER]

with model.session(remote=True):
    with model.trace(SOURCE):
        paris_state = layer.output[0, -1]  # stays on the fabric: used below, never downloaded
    with model.generate(PROMPT, max_new_tokens=STEPS) as tracer:
        plain_tokens = tracer.output.save()
    with model.generate(PROMPT, max_new_tokens=STEPS) as tracer:
        with tracer.iter[0]:
            layer.output[:, -1] = paris_state
        steered_tokens = tracer.output.save()

plain = model.tokenizer.decode(plain_tokens.value[0, -STEPS:])
steered = model.tokenizer.decode(steered_tokens.value[0, -STEPS:])
print(f"prompt   {PROMPT!r}")
print(f"plain    ->{plain!r}")
print(f"steered  ->{steered!r}  (layer {LAYER}'s state from {SOURCE!r}, first step only)")
print(f"answer: the steered continuation begins with {steered.split()[0]!r}")
