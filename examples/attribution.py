"""Attribution by gradients on the fabric: which input tokens push the model towards " Paris"?

Gradient x activation of the " Paris" logit with respect to each token's embedding, computed
on the fabric inside one trace (the backward pass runs there too).

    NNFABRIC_URL=... NNFABRIC_API_KEY=... python examples/attribution.py
"""

import os

import nnfabric

fabric = nnfabric.connect()
model = fabric.model(os.environ.get("NNFABRIC_MODEL", "smollm2"))

PROMPT = "The Eiffel Tower is in the city of"
paris = model.tokenizer(" Paris")["input_ids"][0]

with model.trace(PROMPT, remote=True):
    embeddings = model.model.embed_tokens.output
    logits = model.lm_head.output
    top = logits[0, -1].topk(3).indices.save()
    logits[0, -1, paris].backward()
    scores = (embeddings.grad * embeddings).sum(-1)[0].save()

print(f"{PROMPT!r} -> top tokens {[model.tokenizer.decode(int(i)) for i in top.value]}")
print("gradient x embedding for the ' Paris' logit, per input token:")
tokens = model.tokenizer.convert_ids_to_tokens(model.tokenizer(PROMPT)["input_ids"])
largest = float(scores.value.abs().max())
for token, score in zip(tokens, scores.value.tolist(), strict=True):
    bar = "#" * round(30 * abs(score) / largest)
    print(f"  {token.replace('Ġ', ' '):>10}  {score:+8.3f}  {bar}")
ranked = sorted(zip(scores.value.tolist(), tokens, strict=True), reverse=True)
print(f"answer: the tokens that most raise ' Paris' are {[t.replace('Ġ', ' ') for _, t in ranked[:2]]}")
