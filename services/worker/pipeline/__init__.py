"""One language model split into pipeline stages, each holding a contiguous range of its layers.

Usage::

    plan = StagePlan.balanced(shell, 2)                  # plan.py: which stage holds which layers
    stage = Stage(load_stage(directory, plan, 1), plan, 1)   # weights.py, stage.py: one stage
    pipeline = Pipeline(shell, tokenizer, plan, links)   # links.py: each stage, in-process or a Ray actor
    saved = run_graph(graph, tensors, pipeline)          # exactly as on one device

Modules: `plan` (the layer plan), `weights` (a stage's model: stubs, loading only its weights),
`transfer` (values as they travel between processes), `interleaver` (the graph's run on one
stage, and its state), `stage` (one stage's share of every run, the protocol its replies
follow), `links` (the replica's side: calling stages and driving a run), `actors` (stages as
Ray actors in the replica's placement group). Only the worker runs any of it: the client
library knows a staged model only as an adapter with an `interleaver` (nnfabric.runtime.execute).

How a graph runs over stages. Every stage runs the model's own forward, with the layers of other
stages replaced by stubs that pass their input through (and, after the first stage, the input
embeddings by stubs of the right shape). The first stage stops at the first layer it does not
hold and hands on that layer's input; a later stage replaces its first layer's input by the
hidden state it receives. Each stage hooks only the modules it holds; the graph's values and
progress (the interleaver's state) travel with the hidden state, so a value read on stage 0 can
be written into stage 1. A call into a module that lives on a later stage (`model.lm_head(h)` for
a logit lens of an early layer) waits, with everything computed from it, until the run reaches
that stage. Gradients flow back stage by stage: each stage is given the gradient of its output
and hands the gradient of its input to the stage before it. A value the graph carries from an
earlier stage into a later one is a constant there: gradients reach earlier stages through the
hidden state.

The replica that owns the stages keeps a "shell": the whole model's module tree on the meta
device (no memory), for the module tree thin clients see, tokenizing, and Hugging Face's own
`generate` loop, whose forward calls run through the stages; each stage keeps its own key/value
cache for the layers it holds.
"""
