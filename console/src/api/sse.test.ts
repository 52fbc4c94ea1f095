import { afterEach, describe, expect, it, vi } from 'vitest'
import { applyEvent, parseEvents, streamChat } from './sse'
import { json, sseResponse, stubFetch } from '../test/helpers'

afterEach(() => vi.unstubAllGlobals())

const chunk = (content: string) => JSON.stringify({ choices: [{ index: 0, delta: { content }, finish_reason: null }] })

describe('server-sent events', () => {
  it('splits complete events and keeps the partial one', () => {
    const { events, rest } = parseEvents('data: {"a":1}\n\ndata: [DONE]\n\ndata: {"b"')
    expect(events).toEqual(['{"a":1}', '[DONE]'])
    expect(rest).toBe('data: {"b"')
  })

  it('accepts CRLF line ends and multi-line data', () => {
    expect(parseEvents('data: one\r\ndata: two\r\n\r\n').events).toEqual(['one\ntwo'])
  })

  it('applies deltas, usage and the end', () => {
    const deltas: string[] = []
    let usage = null
    const handlers = { onDelta: (d: string) => deltas.push(d), onUsage: (u: unknown) => (usage = u) }
    expect(applyEvent(chunk('he'), handlers)).toBe(false)
    expect(applyEvent(JSON.stringify({ choices: [], usage: { prompt_tokens: 3, completion_tokens: 2 } }), handlers)).toBe(false)
    expect(applyEvent('[DONE]', handlers)).toBe(true)
    expect(deltas).toEqual(['he'])
    expect(usage).toEqual({ prompt_tokens: 3, completion_tokens: 2 })
  })

  it('raises an error sent inside the stream', () => {
    expect(() => applyEvent(JSON.stringify({ error: { message: 'refused', code: 'content_filter' } }), { onDelta: () => {} })).toThrow('refused')
  })

  it('streams a chat completion from the API', async () => {
    const { calls } = stubFetch({ 'POST /v1/chat/completions': () => sseResponse([chunk('a'), chunk('b'), '[DONE]']) })
    const deltas: string[] = []
    await streamChat({ model: 'tiny-llama', messages: [{ role: 'user', content: 'hi' }], temperature: 1, top_p: 1, max_tokens: 8 }, { onDelta: (d) => deltas.push(d) })
    expect(deltas.join('')).toBe('ab')
    expect(calls[0]?.body).toMatchObject({ model: 'tiny-llama', stream: true, stream_options: { include_usage: true } })
  })

  it('raises the API error when the request is refused', async () => {
    stubFetch({
      'POST /v1/chat/completions': () =>
        json({ error: { message: 'the model `nope` does not exist', type: 'invalid_request_error', param: 'model', code: 'model_not_found' } }, 404),
    })
    await expect(streamChat({ model: 'nope', messages: [], temperature: 1, top_p: 1, max_tokens: 1 }, { onDelta: () => {} })).rejects.toMatchObject({
      code: 'model_not_found',
    })
  })
})
