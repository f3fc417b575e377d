"""Activation patching on the fabric: where does the model decide "Paris" over "Rome"?

For every layer, the clean prompt's last-token state replaces the corrupted prompt's, and we
read how likely " Paris" becomes. All 31 runs (clean, corrupted, one per layer) are invokes of
ONE trace: one job, one forward pass over 31 rows.

    NNFABRIC_URL=... NNFABRIC_API_KEY=... python examples/patching.py
"""

import os

import nnfabric

fabric = nnfabric.connect()  # NNFABRIC_URL, NNFABRIC_API_KEY (or ~/.config/nnfabric/config.toml)
model = fabric.model(os.environ.get("NNFABRIC_MODEL", "smollm2"))  # module tree + tokenizer, no weights

CLEAN = "The Eiffel Tower is in the city of"
CORRUPT = "The Colosseum is in the city of"
paris = model.tokenizer(" Paris")["input_ids"][0]
layers = model.model.layers

with model.trace(remote=True) as tracer:
    with tracer.invoke(CLEAN):
        clean_states = [layer.output[:, -1] for layer in layers]
        clean = model.lm_head.output[0, -1].softmax(-1).save()
    with tracer.invoke(CORRUPT):
        corrupt = model.lm_head.output[0, -1].softmax(-1).save()
    patched = []
    for i, layer in enumerate(layers):
        with tracer.invoke(CORRUPT):
            layer.output[:, -1] = clean_states[i]
            patched.append(model.lm_head.output[0, -1].softmax(-1)[paris].save())


def top(probs, k=3):
    values, ids = probs.topk(k)
    return ", ".join(f"{model.tokenizer.decode(int(i))!r} {float(v):.2f}" for v, i in zip(values, ids, strict=True))


print(f"clean    {CLEAN!r:40} -> {top(clean.value)}")
print(f"corrupt  {CORRUPT!r:40} -> {top(corrupt.value)}")
print("patching the clean last-token state into the corrupted run, layer by layer:")
for i, p in enumerate(patched):
    bar = "#" * round(40 * float(p.value))
    print(f"  layer {i:2d}  P(' Paris') = {float(p.value):.2f}  {bar}")
best = max(range(len(patched)), key=lambda i: float(patched[i].value))
print(f"answer: patching layer {best} makes the corrupted prompt say {model.tokenizer.decode(paris)!r}")
