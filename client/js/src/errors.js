/**
 * Typed errors for everything that can go wrong talking to a hooklab server.
 *
 * A server error carries the server's machine-readable `code`, its `message`, `hint`, the HTTP
 * `status` and the `requestId` that names the request in the server's log. Each code has its own
 * class (as in the Python client's `hooklab.errors`), so callers tell them apart with
 * `instanceof` instead of parsing text.
 */

/** Base class of every hooklab client error. */
export class HooklabError extends Error {
  /** @param {string} message @param {ErrorOptions} [options] */
  constructor(message, options) {
    super(message, options);
    this.name = new.target.name;
  }
}

/**
 * The server refused or failed a request (a 4xx/5xx answer, or an error frame or event after
 * the response had started). `message` is the server's message; Node prints `code`, `hint`,
 * `status` and `requestId` beside it when the error is logged.
 */
export class ServerError extends HooklabError {
  /**
   * @param {string} code machine-readable error code, e.g. "unknown_hook"
   * @param {string} message for people
   * @param {{hint?: string | null, status?: number, requestId?: string | null,
   *          retryAfter?: number | null}} [details]
   */
  constructor(code, message, details = {}) {
    super(message);
    /** Machine-readable, e.g. "unknown_hook" (what selects the class). */
    this.code = code;
    /** What to do about it, when the server knows. */
    this.hint = details.hint ?? null;
    this.status = details.status ?? 0;
    this.requestId = details.requestId ?? null;
    /** Seconds to wait before trying again, when the server said (429). */
    this.retryAfter = details.retryAfter ?? null;
  }
}

/** Malformed body or wrong content type. */
export class BadRequestError extends ServerError {}
/** The server does not answer to the host name used to reach it (its --allowed-hosts). */
export class BadHostError extends BadRequestError {}
export class MethodNotAllowedError extends BadRequestError {}
/** The request body did not reach the server in time. */
export class BodyTimeoutError extends BadRequestError {}
export class UnsupportedMediaTypeError extends BadRequestError {}
/** A field, hook spec or index the server cannot accept. */
export class InvalidRequestError extends ServerError {}
export class UnknownHookError extends InvalidRequestError {}
export class BadIndexError extends InvalidRequestError {}
export class BadShapeError extends InvalidRequestError {}
export class BadDtypeError extends InvalidRequestError {}
export class BadValueError extends InvalidRequestError {}
export class ConflictingSpecsError extends InvalidRequestError {}
/** Over one of the server's limits (tokens, batch, body or response size). */
export class TooLargeError extends ServerError {}
/** A stored tensor or cache that does not exist (any more), or an unknown weight. */
export class NotFoundError extends ServerError {}
export class StoreFullError extends ServerError {}
/** No API key was sent, or the server does not know it. */
export class UnauthorizedError extends ServerError {}
/** Over one of the key's quotas; `retryAfter` says when to try again, when waiting helps. */
export class QuotaError extends ServerError {}
/** Too much work queued; try again after `retryAfter` seconds. */
export class QueueFullError extends ServerError {}
/** The work ran past its `timeout_s` on the server and was stopped. */
export class DeadlineExceededError extends ServerError {}
/** A part the server needs (Redis, the model's workers) is down. */
export class UnavailableError extends ServerError {}
/** A client callback raised, timed out or disconnected. */
export class CallbackFailedError extends ServerError {}
/** A server bug; `requestId` identifies it in the server's log. */
export class InternalServerError extends ServerError {}

/** The server could not be reached, or the connection broke. */
export class ConnectionFailedError extends HooklabError {}
/** The server did not answer within the client's `timeoutMs`. */
export class RequestTimeoutError extends HooklabError {}
/** Bytes that do not follow the hooklab wire format (proto/README.md). */
export class WireFormatError extends HooklabError {}
/** A frame stream (or event stream) that stopped before its last frame. */
export class TruncatedStreamError extends WireFormatError {}

/** @type {Record<string, typeof ServerError>} */
export const ERROR_CLASSES = {
  bad_request: BadRequestError,
  bad_host: BadHostError,
  method_not_allowed: MethodNotAllowedError,
  request_timeout: BodyTimeoutError,
  unsupported_media_type: UnsupportedMediaTypeError,
  validation_error: InvalidRequestError,
  unknown_hook: UnknownHookError,
  bad_index: BadIndexError,
  bad_shape: BadShapeError,
  bad_dtype: BadDtypeError,
  bad_value: BadValueError,
  conflicting_specs: ConflictingSpecsError,
  too_large: TooLargeError,
  not_found: NotFoundError,
  store_full: StoreFullError,
  unauthorized: UnauthorizedError,
  quota: QuotaError,
  queue_full: QueueFullError,
  deadline_exceeded: DeadlineExceededError,
  unavailable: UnavailableError,
  callback_failed: CallbackFailedError,
  internal: InternalServerError,
};

/**
 * The typed error for a server error code (unknown codes give a plain `ServerError`).
 *
 * @param {string} code
 * @param {string} message
 * @param {{hint?: string | null, status?: number, requestId?: string | null,
 *          retryAfter?: number | null}} [details]
 * @returns {ServerError}
 */
export function serverError(code, message, details) {
  const Class = Object.hasOwn(ERROR_CLASSES, code) ? ERROR_CLASSES[code] : ServerError;
  return new Class(code, message, details);
}
