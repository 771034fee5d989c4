export interface ServerErrorDetails {
  hint?: string | null;
  status?: number;
  requestId?: string | null;
  retryAfter?: number | null;
}

/** Base class of every hooklab client error. */
export class HooklabError extends Error {
  constructor(message: string, options?: ErrorOptions);
}

/** The server refused or failed a request (a 4xx/5xx answer, or an error frame or event). */
export class ServerError extends HooklabError {
  constructor(code: string, message: string, details?: ServerErrorDetails);
  /** Machine-readable, e.g. "unknown_hook". */
  readonly code: string;
  /** What to do about it, when the server knows. */
  readonly hint: string | null;
  /** The HTTP status (0 for a failure after the response started: an error frame or event). */
  readonly status: number;
  /** Names the request in the server's log. */
  readonly requestId: string | null;
  /** Seconds to wait before trying again, when the server said (429). */
  readonly retryAfter: number | null;
}

export class BadRequestError extends ServerError {}
export class BadHostError extends BadRequestError {}
export class MethodNotAllowedError extends BadRequestError {}
export class BodyTimeoutError extends BadRequestError {}
export class UnsupportedMediaTypeError extends BadRequestError {}
export class InvalidRequestError extends ServerError {}
export class UnknownHookError extends InvalidRequestError {}
export class BadIndexError extends InvalidRequestError {}
export class BadShapeError extends InvalidRequestError {}
export class BadDtypeError extends InvalidRequestError {}
export class BadValueError extends InvalidRequestError {}
export class ConflictingSpecsError extends InvalidRequestError {}
export class TooLargeError extends ServerError {}
export class NotFoundError extends ServerError {}
export class StoreFullError extends ServerError {}
export class UnauthorizedError extends ServerError {}
export class QuotaError extends ServerError {}
export class QueueFullError extends ServerError {}
export class DeadlineExceededError extends ServerError {}
export class UnavailableError extends ServerError {}
export class CallbackFailedError extends ServerError {}
export class InternalServerError extends ServerError {}

/** The server could not be reached, or the connection broke. */
export class ConnectionFailedError extends HooklabError {}
/** The server sent nothing within the client's `timeoutMs`. */
export class RequestTimeoutError extends HooklabError {}
/** Bytes that do not follow the hooklab wire format. */
export class WireFormatError extends HooklabError {}
/** A frame or event stream that stopped before its last frame. */
export class TruncatedStreamError extends WireFormatError {}

/** The class of each server error code. */
export const ERROR_CLASSES: Readonly<Record<string, typeof ServerError>>;

/** The typed error for a server error code (unknown codes give a plain ServerError). */
export function serverError(code: string, message: string, details?: ServerErrorDetails): ServerError;
