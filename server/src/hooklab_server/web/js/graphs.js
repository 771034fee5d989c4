// Small functions of the logits computed on the server (a request's `logits_graph`, proto
// README §7), so that only their results travel, not [batch, pos, d_vocab] logits: built by
// hand here, as a traced Python function would be.

const ALL = { slice: [null, null, null] };

function graph(dtype, nodes, output) {
  return {
    graph_v: 1,
    opset: "hooklab-ops/1",
    input: { shape: [null, null, null], dtype },
    consts: [],
    nodes,
    output: { n: output },
  };
}

/** Nodes giving the logits as float32 (node 0 is the input itself when already F32). */
function asFloat(dtype) {
  return dtype === "F32" ? [] : [{ op: "float", args: { self: { in: 0 } } }];
}

function logitsRef(dtype) {
  return dtype === "F32" ? { in: 0 } : { n: 0 };
}

function column(of, id) {
  return {
    op: "getitem",
    args: { self: of, index: [{ ellipsis: true }, { slice: [id, id + 1, null] }] },
  };
}

/**
 * The logit lens's numbers at every row and position: the k likeliest tokens' probabilities
 * and ids, and — given an answer pair — logit[answer] − logit[wrong]. Answers
 * [rows, pos, 2k (+1)]: probabilities, then ids (as floats), then the difference.
 */
export function lensGraph(dtype, k, pair) {
  const nodes = asFloat(dtype);
  const logits = logitsRef(dtype);
  const at = () => nodes.length - 1;
  nodes.push({ op: "softmax", args: { self: logits, dim: -1 } });
  nodes.push({ op: "topk", args: { self: { n: at() }, k, dim: -1 } });
  const top = at();
  nodes.push({ op: "float", args: { self: { n: top, o: 1 } } });
  const parts = [{ n: top, o: 0 }, { n: at() }];
  if (pair) {
    nodes.push(column(logits, pair.answer.id));
    nodes.push(column(logits, pair.wrong.id));
    nodes.push({ op: "sub", args: { self: { n: at() - 1 }, other: { n: at() } } });
    parts.push({ n: at() });
  }
  nodes.push({ op: "cat", args: { tensors: parts, dim: -1 } });
  return graph(dtype, nodes, at());
}

/** logit[answer] − logit[wrong] at the last position of each row: answers [rows]. */
export function logitDiffGraph(dtype, pair) {
  const nodes = asFloat(dtype);
  const logits = logitsRef(dtype);
  const at = () => nodes.length - 1;
  const last = { op: "getitem", args: { self: logits, index: [ALL, -1] } };
  nodes.push(last);
  const row = at();
  nodes.push({ op: "getitem", args: { self: { n: row }, index: [ALL, pair.answer.id] } });
  nodes.push({ op: "getitem", args: { self: { n: row }, index: [ALL, pair.wrong.id] } });
  nodes.push({ op: "sub", args: { self: { n: at() - 1 }, other: { n: at() } } });
  return graph(dtype, nodes, at());
}
