// The job lifecycle from Node.js (18+), with nothing but the standard library:
//   node --experimental-websocket examples/http/patch_and_save.mjs      (Node 22+: no flag needed;
//   a Node without WebSocket polls the job's state instead)
// NNFABRIC_URL and NNFABRIC_API_KEY say where and who; NNFABRIC_MODEL which catalog model.
// It submits a JSON job that saves one layer's output and zeroes another's last position,
// follows the job's events on the websocket, then fetches the result as JSON.
const url = process.env.NNFABRIC_URL ?? "http://127.0.0.1:8000";
const key = process.env.NNFABRIC_API_KEY;
const model = process.env.NNFABRIC_MODEL ?? "gpt2";
const auth = { Authorization: `Bearer ${key}` };

// Layers are named as in the model's tree: GET /v1/models/{name}/structure.
const structure = await (await fetch(`${url}/v1/models/${model}/structure`, { headers: auth })).json();
const blocks = Object.keys(structure.tree.children.transformer.children.h.children);
const last = `transformer.h.${blocks.length - 1}`;

// A graph: node ids are positions in `nodes`; {"$ref": i} is node i's value.
const job = {
  model,
  graph: {
    kind: "trace",
    invokes: [{ args: ["The Eiffel Tower is in the city of"] }],
    nodes: [
      { op: "output", args: ["transformer.h.0", 0, 0] },                          // 0: block 0's output
      { op: "setitem", args: [{ $ref: 0 }, { $tuple: [{ $slice: [null, null, null] }, -1] }, 0.0] },  // [:, -1] = 0
      { op: "output", args: [last, 0, 0] },                                       // 2: the last block's output
    ],
    saves: [2],
  },
  names: { hidden: "2" },
};

const submitted = await fetch(`${url}/v1/jobs`, {
  method: "POST",
  headers: { ...auth, "Content-Type": "application/json" },
  body: JSON.stringify(job),
});
if (submitted.status !== 202) throw new Error(`${submitted.status}: ${await submitted.text()}`);
const { id } = await submitted.json();
console.log(`submitted job ${id}`);

// Events: queued (with a position), running, then completed | failed | cancelled.
const final = typeof WebSocket === "function" ? await follow(id) : await poll(id);
if (final.type !== "completed") throw new Error(`job ${final.type}: ${final.message}`);

const result = await (await fetch(`${url}/v1/jobs/${id}/result`, {
  headers: { ...auth, Accept: "application/json" },
})).json();
const hidden = result.values[result.names.hidden];
const floats = new Float32Array(Uint8Array.from(atob(hidden.data), (c) => c.charCodeAt(0)).buffer);
console.log(`hidden: ${hidden.dtype} [${hidden.shape}] first values ${Array.from(floats.slice(0, 3)).map((v) => v.toFixed(4))}`);
console.log(`answer: ${last} output has shape [${hidden.shape}]`);

function follow(id) {
  return new Promise((resolve, reject) => {
    // The key as a subprotocol pair, as browsers must (they cannot set headers on a websocket),
    // rather than in the URL, which proxies write to their logs.
    const ws = new WebSocket(`${url.replace(/^http/, "ws")}/v1/jobs/${id}/events`, ["bearer", key]);
    ws.onmessage = (message) => {
      const event = JSON.parse(message.data);
      console.log(`event ${event.type}${event.position !== undefined ? ` (position ${event.position})` : ""}`);
      if (["completed", "failed", "cancelled"].includes(event.type)) { ws.close(); resolve(event); }
    };
    ws.onerror = () => reject(new Error("websocket error"));
  });
}

async function poll(id) {  // a Node without WebSocket: the job's record says the same
  for (;;) {
    const job = await (await fetch(`${url}/v1/jobs/${id}`, { headers: auth })).json();
    console.log(`event ${job.state}`);
    if (["completed", "failed", "cancelled"].includes(job.state)) return { type: job.state, message: job.error };
    await new Promise((r) => setTimeout(r, 200));
  }
}
