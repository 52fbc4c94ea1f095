// Test helpers: a fetch that answers from a table of routes, a stand-in for XMLHttpRequest,
// and a mount with the app's plugins (Element Plus, i18n, a fresh Pinia).
import { vi } from 'vitest'
import ElementPlus from 'element-plus'
import { createPinia, setActivePinia } from 'pinia'
import { makeI18n } from '../i18n'

export type Handler = (init: RequestInit | undefined, url: string) => Response | Promise<Response>

export function json(body: unknown, status = 200, headers: Record<string, string> = {}): Response {
  return new Response(JSON.stringify(body), { status, headers: { 'content-type': 'application/json', ...headers } })
}

/** Stubs `fetch`: "METHOD /path" (query ignored) to a handler; anything else is a 404. */
export function stubFetch(routes: Record<string, Handler>) {
  const calls: Array<{ method: string; path: string; body: unknown }> = []
  const fetchMock = vi.fn(async (input: RequestInfo | URL, init?: RequestInit) => {
    const url = typeof input === 'string' ? input : input instanceof URL ? input.href : input.url
    const path = url.replace(/^https?:\/\/[^/]+/, '').split('?')[0] ?? ''
    const method = (init?.method ?? 'GET').toUpperCase()
    calls.push({ method, path, body: typeof init?.body === 'string' ? JSON.parse(init.body) : undefined })
    const handler = routes[`${method} ${path}`]
    if (!handler) return json({ error: { message: `no route ${method} ${path}`, type: 'invalid_request_error', param: null, code: 'unknown_route' } }, 404)
    return handler(init, url)
  })
  vi.stubGlobal('fetch', fetchMock)
  return { fetchMock, calls }
}

export function plugins() {
  const pinia = createPinia()
  setActivePinia(pinia)
  return [pinia, makeI18n('en'), ElementPlus]
}

/** A streamed SSE body from whole events. */
export function sseResponse(events: string[]): Response {
  const encoder = new TextEncoder()
  const stream = new ReadableStream<Uint8Array>({
    start(controller) {
      for (const event of events) controller.enqueue(encoder.encode(`data: ${event}\n\n`))
      controller.close()
    },
  })
  return new Response(stream, { status: 200, headers: { 'content-type': 'text/event-stream' } })
}

/**
 * A stand-in for XMLHttpRequest (stub it with `vi.stubGlobal('XMLHttpRequest', FakeXhr)`):
 * records what is sent; the test drives the progress and the answer.
 */
export class FakeXhr {
  /** The newest request, and every request since `FakeXhr.reset()`. */
  static last: FakeXhr | null = null
  static all: FakeXhr[] = []
  static reset(): void {
    FakeXhr.last = null
    FakeXhr.all = []
  }
  method = ''
  url = ''
  withCredentials = false
  status = 0
  statusText = ''
  responseText = ''
  body: FormData | Blob | null = null
  headers: Record<string, string> = {}
  aborted = false
  upload: { onprogress: ((event: ProgressEvent) => void) | null } = { onprogress: null }
  onload: (() => void) | null = null
  onerror: (() => void) | null = null
  onabort: (() => void) | null = null
  constructor() {
    FakeXhr.last = this
    FakeXhr.all.push(this)
  }
  open(method: string, url: string) {
    this.method = method
    this.url = url
  }
  setRequestHeader(name: string, value: string) {
    this.headers[name] = value
  }
  send(body: FormData | Blob) {
    this.body = body
  }
  abort() {
    this.aborted = true
    this.onabort?.()
  }
  progress(loaded: number, total: number) {
    this.upload.onprogress?.({ lengthComputable: true, loaded, total } as ProgressEvent)
  }
  answer(status: number, body: unknown) {
    this.status = status
    this.responseText = typeof body === 'string' ? body : JSON.stringify(body)
    this.onload?.()
  }
  fail() {
    this.onerror?.()
  }
}
