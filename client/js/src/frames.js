/**
 * The frame stream (proto/README.md §3–4): `[u32 LE length][msgpack map]`, repeated, from a
 * `begin` frame through tensor frames to an `end` or `error` frame.
 *
 * Each frame is copied once, from the network's chunks into a buffer of its own, so every
 * tensor payload (64-byte aligned within its map) is viewed in place by its typed array.
 */

import { Decoder } from "@msgpack/msgpack";

import { TruncatedStreamError, WireFormatError, serverError } from "./errors.js";
import { DTYPES, Tensor, arrayOf, numel, unknownDtype } from "./tensor.js";

export const FRAMES_MEDIA_TYPE = "application/vnd.hooklab.frames+msgpack";
/** The largest frame a reader accepts unless told otherwise (what a u32 prefix can say). */
export const DEFAULT_MAX_FRAME_BYTES = 2 ** 32 - 1;
const CONTROL_KINDS = new Set(["begin", "end", "error"]);

const rejectExtensions = {
  encode: () => null,
  decode: (_data, type) => {
    throw new WireFormatError(`msgpack extension types are not allowed (found ext type ${type})`);
  },
};
const decoder = new Decoder({ extensionCodec: rejectExtensions });

/** One msgpack map, or a WireFormatError saying why not. */
function decodeMap(bytes, what) {
  let value;
  try {
    value = decoder.decode(bytes);
  } catch (error) {
    if (error instanceof WireFormatError) throw error;
    throw new WireFormatError(`${what} is not valid msgpack: ${error.message}`);
  }
  if (value === null || typeof value !== "object" || Array.isArray(value) || ArrayBuffer.isView(value)) {
    throw new WireFormatError(`${what} must be a msgpack map`);
  }
  return value;
}

/**
 * Decode one tensor map (proto/README.md §1, without a length prefix) into a Tensor whose data
 * views `bytes` when its payload is aligned there (always, for a frame in a fresh buffer).
 * @param {Uint8Array} bytes
 * @returns {Tensor}
 */
export function decodeTensor(bytes) {
  return tensorOf(decodeMap(bytes, "a tensor map"), bytes);
}

function tensorOf(map, bytes) {
  const { kind, v, name, dtype, shape, data } = map;
  if (kind !== "tensor") throw new WireFormatError(`expected a tensor map, got kind ${JSON.stringify(kind)}`);
  if (v !== 1) throw new WireFormatError(`tensor version ${v} is not supported; expected 1`);
  if (typeof dtype !== "string" || !Object.hasOwn(DTYPES, dtype)) throw new WireFormatError(unknownDtype(dtype));
  if (!Array.isArray(shape) || !shape.every((size) => Number.isInteger(size) && size >= 0)) {
    throw new WireFormatError(`shape ${JSON.stringify(shape)} is not a list of sizes >= 0`);
  }
  if (!(data instanceof Uint8Array)) throw new WireFormatError("a tensor's 'data' must be msgpack bin");
  const expected = numel(shape) * DTYPES[dtype].bytes;
  if (data.byteLength !== expected) {
    throw new WireFormatError(`shape [${shape}] of ${dtype} needs ${expected} bytes, got ${data.byteLength}`);
  }
  // data is the map's last value: its payload ends the map (offset = length - byte length).
  if (data.buffer !== bytes.buffer || data.byteOffset + data.byteLength !== bytes.byteOffset + bytes.byteLength) {
    throw new WireFormatError("a tensor's 'data' must be the last value of its map");
  }
  return new Tensor(dtype, shape, arrayOf(dtype, data), typeof name === "string" ? name : "");
}

/**
 * Decode one frame's map: `{kind: "tensor", tensor}` or `{kind: "begin"|"end"|"error", fields}`.
 * @param {Uint8Array} bytes
 */
export function decodeFrame(bytes) {
  const map = decodeMap(bytes, "a frame");
  const { kind } = map;
  if (kind === "tensor") return { kind, tensor: tensorOf(map, bytes) };
  if (!CONTROL_KINDS.has(kind)) {
    throw new WireFormatError(`unknown frame kind ${JSON.stringify(kind)}; expected tensor, begin, end or error`);
  }
  const { kind: _, ...fields } = map;
  if (kind === "error" && (typeof fields.code !== "string" || typeof fields.message !== "string")) {
    throw new WireFormatError("an error frame needs string 'code' and 'message' fields");
  }
  return { kind, fields };
}

/**
 * The frames of a stream fed in chunks of any size (a fetch body, a file's bytes), as they
 * complete. A frame's buffer is allocated once all its bytes have arrived, and filled with one
 * copy. Raises TruncatedStreamError when the chunks end before an `end` or `error` frame.
 * @param {AsyncIterable<Uint8Array> | Iterable<Uint8Array>} chunks
 * @param {{maxFrameBytes?: number}} [options]
 */
export async function* readFrames(chunks, { maxFrameBytes = DEFAULT_MAX_FRAME_BYTES } = {}) {
  const prefix = new Uint8Array(4);
  let prefixFilled = 0;
  let size = 0; // the current frame's length, once its prefix is complete
  let pieces = [];
  let received = 0;
  let frames = 0;
  let finished = false;
  for await (const chunk of chunks) {
    let at = 0;
    while (at < chunk.byteLength) {
      if (finished) throw new WireFormatError("bytes after the stream's last (end or error) frame");
      if (prefixFilled < 4) {
        const take = Math.min(4 - prefixFilled, chunk.byteLength - at);
        prefix.set(chunk.subarray(at, at + take), prefixFilled);
        prefixFilled += take;
        at += take;
        if (prefixFilled < 4) break;
        size = new DataView(prefix.buffer).getUint32(0, true);
        if (size === 0 || size > maxFrameBytes) {
          throw new WireFormatError(`frame length ${size} is ${size ? `above the limit of ${maxFrameBytes} bytes` : "zero"}`);
        }
        continue;
      }
      const take = Math.min(size - received, chunk.byteLength - at);
      pieces.push(chunk.subarray(at, at + take));
      received += take;
      at += take;
      if (received < size) continue;
      const frame = decodeFrame(gather(pieces, size));
      if (frames === 0 && frame.kind !== "begin" && frame.kind !== "error") {
        throw new WireFormatError(`a stream starts with a begin frame, not ${frame.kind}`);
      }
      frames += 1;
      finished = frame.kind === "end" || frame.kind === "error";
      pieces = [];
      received = 0;
      prefixFilled = 0;
      yield frame;
    }
  }
  if (!finished) {
    throw new TruncatedStreamError(
      `the frame stream ended after ${frames} frames without an end or error frame (truncated)`,
    );
  }
}

/** `pieces` (totalling `size` bytes) copied into one fresh buffer. */
function gather(pieces, size) {
  const out = new Uint8Array(size);
  let offset = 0;
  for (const piece of pieces) {
    out.set(piece, offset);
    offset += piece.byteLength;
  }
  return out;
}

/**
 * A whole frame stream decoded: `meta` holds the begin frame's fields with the end frame's
 * merged over them (a streamed result sends fields known only at the end there); `tensors`
 * maps names to tensors in arrival order. An `error` frame throws its typed ServerError.
 * @param {AsyncIterable<Uint8Array> | Iterable<Uint8Array>} chunks
 * @param {{maxFrameBytes?: number, status?: number}} [options]
 * @returns {Promise<{meta: Record<string, any>, tensors: Record<string, Tensor>}>}
 */
export async function collectFrames(chunks, options = {}) {
  let meta = {};
  const tensors = {};
  for await (const frame of readFrames(chunks, options)) {
    if (frame.kind === "tensor") {
      // defineProperty: a tensor named "__proto__" is an entry like any other.
      Object.defineProperty(tensors, frame.tensor.name, {
        value: frame.tensor, enumerable: true, writable: true, configurable: true,
      });
    } else if (frame.kind === "error") {
      const { code, message, hint, request_id: requestId } = frame.fields;
      throw serverError(code, message, { hint, requestId, status: options.status ?? 0 });
    } else {
      meta = { ...meta, ...frame.fields };
    }
  }
  return { meta, tensors };
}
