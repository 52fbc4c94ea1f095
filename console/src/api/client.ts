// A small fetch wrapper for the node's API: same-origin requests that carry the session
// cookie, JSON in and out, and the API's OpenAI-shaped errors turned into ApiError.
import type { components } from './schema'

export type ErrorBody = components['schemas']['ErrorBody']

/** An error answer of the API (or no answer at all: status 0). */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    readonly param: string | null = null,
    readonly retryAfterSecs: number | null = null,
  ) {
    super(message)
    this.name = 'ApiError'
  }
}

type Listener = (error: ApiError) => void
let unauthorizedListener: Listener | null = null

/** Called on every 401, so the app can send the user back to the sign-in page. */
export function onUnauthorized(listener: Listener | null): void {
  unauthorizedListener = listener
}

export interface RequestOptions {
  query?: Record<string, string | number | undefined>
  signal?: AbortSignal
}

export function withQuery(path: string, query?: RequestOptions['query']): string {
  if (!query) return path
  const params = new URLSearchParams()
  for (const [key, value] of Object.entries(query)) {
    if (value !== undefined && value !== '') params.set(key, String(value))
  }
  const text = params.toString()
  return text ? `${path}?${text}` : path
}

/** Reads an error answer: the API's `{error: {message, code, param}}`, or a generic one. */
export async function errorFrom(response: Response): Promise<ApiError> {
  const retryAfter = Number(response.headers.get('retry-after'))
  const retry = Number.isFinite(retryAfter) && retryAfter > 0 ? retryAfter : null
  try {
    const body = (await response.json()) as Partial<ErrorBody>
    if (body.error && typeof body.error.message === 'string') {
      return new ApiError(response.status, body.error.code, body.error.message, body.error.param ?? null, retry)
    }
  } catch {
    // Not JSON: fall through to the generic error.
  }
  return new ApiError(response.status, 'http_error', response.statusText || `HTTP ${response.status}`, null, retry)
}

export async function request<T>(method: string, path: string, body?: unknown, options: RequestOptions = {}): Promise<T> {
  let response: Response
  try {
    response = await fetch(withQuery(path, options.query), {
      method,
      credentials: 'same-origin',
      headers: body === undefined ? { accept: 'application/json' } : { accept: 'application/json', 'content-type': 'application/json' },
      body: body === undefined ? undefined : JSON.stringify(body),
      signal: options.signal,
    })
  } catch (cause) {
    if (cause instanceof DOMException && cause.name === 'AbortError') throw cause
    throw new ApiError(0, 'network_error', 'network')
  }
  if (!response.ok) {
    const error = await errorFrom(response)
    if (response.status === 401) unauthorizedListener?.(error)
    throw error
  }
  return (await response.json()) as T
}

export const api = {
  get: <T>(path: string, options?: RequestOptions) => request<T>('GET', path, undefined, options),
  post: <T>(path: string, body?: unknown, options?: RequestOptions) => request<T>('POST', path, body ?? {}, options),
  put: <T>(path: string, body?: unknown) => request<T>('PUT', path, body ?? null),
  patch: <T>(path: string, body: unknown) => request<T>('PATCH', path, body),
  delete: <T>(path: string) => request<T>('DELETE', path),
}
