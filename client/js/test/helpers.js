// Shared by the tests: the golden vectors of proto/vectors/ and small frame builders.
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";

import { encode } from "@msgpack/msgpack";

export const VECTORS = fileURLToPath(new URL("../../../proto/vectors/", import.meta.url));
export const SPEC = JSON.parse(readFileSync(`${VECTORS}vectors.json`, "utf8"));

/** A file's bytes in a fresh buffer of their own (offset 0: what a frame reader allocates). */
export function vectorBytes(file) {
  const read = readFileSync(`${VECTORS}${file}`);
  const bytes = new Uint8Array(read.byteLength);
  bytes.set(read);
  return bytes;
}

/** One frame: the u32 LE length prefix, then the map's bytes. */
export function frame(map) {
  const bytes = map instanceof Uint8Array ? map : encode(map);
  const out = new Uint8Array(4 + bytes.byteLength);
  new DataView(out.buffer).setUint32(0, bytes.byteLength, true);
  out.set(bytes, 4);
  return out;
}

export function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, part) => n + part.byteLength, 0));
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.byteLength;
  }
  return out;
}

/** `bytes` cut into chunks of `size` (the last shorter). */
export function chunked(bytes, size) {
  const chunks = [];
  for (let at = 0; at < bytes.byteLength; at += size) chunks.push(bytes.subarray(at, at + size));
  return chunks;
}

/** vectors.json's values (nested like the shape) with the non-finite strings as numbers. */
export function expectedValues(entry) {
  const convert = (value) => {
    if (Array.isArray(value)) return value.map(convert);
    if (value === "NaN") return NaN;
    if (value === "Infinity") return Infinity;
    if (value === "-Infinity") return -Infinity;
    if (entry.dtype === "I64") return BigInt(value);
    return value;
  };
  return convert(entry.values);
}
