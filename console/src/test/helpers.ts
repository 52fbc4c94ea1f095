// Test helpers: a fetch that answers from a table of routes, and a mount with the app's
// plugins (Element Plus, i18n, a fresh Pinia).
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
