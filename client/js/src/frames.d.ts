import type { Tensor } from "./tensor.js";

export const FRAMES_MEDIA_TYPE: "application/vnd.hooklab.frames+msgpack";
export const DEFAULT_MAX_FRAME_BYTES: number;

export type Frame =
  | { kind: "tensor"; tensor: Tensor }
  | { kind: "begin" | "end"; fields: Record<string, any> }
  | { kind: "error"; fields: { code: string; message: string; hint?: string | null; request_id?: string | null; [key: string]: any } };

export interface ReadOptions {
  /** Refuse frames longer than this (default 2**32 - 1). */
  maxFrameBytes?: number;
}

/** Decode one tensor map (no length prefix); its data views `bytes` when aligned. */
export function decodeTensor(bytes: Uint8Array): Tensor;

/** Decode one frame's map. */
export function decodeFrame(bytes: Uint8Array): Frame;

/** The frames of a stream fed in chunks of any size; throws TruncatedStreamError if it stops early. */
export function readFrames(
  chunks: AsyncIterable<Uint8Array> | Iterable<Uint8Array>,
  options?: ReadOptions,
): AsyncGenerator<Frame, void, undefined>;

/** A whole stream: begin's fields with end's merged over them, and the tensors by name. An
 * error frame throws its typed ServerError. */
export function collectFrames(
  chunks: AsyncIterable<Uint8Array> | Iterable<Uint8Array>,
  options?: ReadOptions & { status?: number },
): Promise<{ meta: Record<string, any>; tensors: Record<string, Tensor> }>;
