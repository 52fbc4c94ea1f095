// Streaming chat completions: POST /v1/chat/completions with `stream: true`, read as
// server-sent events (`data: {chunk}` lines, ending with `data: [DONE]`).
import { ApiError, errorFrom } from './client'
import type { ChatMessage, Citation, InferenceRequest } from './types'

/** What the playground sends: a chat completion request's fields that it sets. */
export type ChatParams = Required<Pick<InferenceRequest, 'model' | 'temperature' | 'top_p' | 'max_tokens'>> &
  Pick<InferenceRequest, 'knowledge_base_ids' | 'retrieval'> & {
    messages: ChatMessage[]
  }

export interface StreamUsage {
  prompt_tokens: number
  completion_tokens: number
}

export interface StreamHandlers {
  onDelta: (text: string) => void
  onUsage?: (usage: StreamUsage) => void
  onFinish?: (reason: string) => void
  /** The sources of a knowledge-base answer, and the query they were retrieved with. */
  onCitations?: (citations: Citation[], query: string | null) => void
}

/** Splits SSE text into the `data:` payloads of complete events; returns the rest. */
export function parseEvents(buffer: string): { events: string[]; rest: string } {
  const events: string[] = []
  const blocks = buffer.replace(/\r\n/g, '\n').split('\n\n')
  const rest = blocks.pop() ?? ''
  for (const block of blocks) {
    const data = block
      .split('\n')
      .filter((line) => line.startsWith('data:'))
      .map((line) => line.slice(5).replace(/^ /, ''))
      .join('\n')
    if (data) events.push(data)
  }
  return { events, rest }
}

interface Chunk {
  choices?: Array<{ delta?: { content?: string | null }; finish_reason?: string | null }>
  usage?: StreamUsage | null
  citations?: Citation[]
  retrieval_query?: string | null
  error?: { message: string; code?: string; param?: string | null }
}

/** Applies one event's payload; true when the stream is over. */
export function applyEvent(data: string, handlers: StreamHandlers): boolean {
  if (data === '[DONE]') return true
  const chunk = JSON.parse(data) as Chunk
  if (chunk.error) throw new ApiError(200, chunk.error.code ?? 'stream_error', chunk.error.message, chunk.error.param ?? null)
  if (Array.isArray(chunk.citations)) handlers.onCitations?.(chunk.citations, chunk.retrieval_query ?? null)
  for (const choice of chunk.choices ?? []) {
    if (choice.delta?.content) handlers.onDelta(choice.delta.content)
    if (choice.finish_reason) handlers.onFinish?.(choice.finish_reason)
  }
  if (chunk.usage) handlers.onUsage?.(chunk.usage)
  return false
}

export async function streamChat(params: ChatParams, handlers: StreamHandlers, signal?: AbortSignal): Promise<void> {
  let response: Response
  try {
    response = await fetch('/v1/chat/completions', {
      method: 'POST',
      credentials: 'same-origin',
      headers: { 'content-type': 'application/json', accept: 'text/event-stream' },
      body: JSON.stringify({ ...params, stream: true, stream_options: { include_usage: true } }),
      signal,
    })
  } catch (cause) {
    if (cause instanceof DOMException && cause.name === 'AbortError') return
    throw new ApiError(0, 'network_error', 'network')
  }
  if (!response.ok || !response.body) throw await errorFrom(response)
  const reader = response.body.getReader()
  const decoder = new TextDecoder()
  let buffer = ''
  try {
    for (;;) {
      const { value, done } = await reader.read()
      if (done) break
      buffer += decoder.decode(value, { stream: true })
      const { events, rest } = parseEvents(buffer)
      buffer = rest
      for (const data of events) {
        if (applyEvent(data, handlers)) return
      }
    }
  } catch (cause) {
    if (cause instanceof DOMException && cause.name === 'AbortError') return
    throw cause
  }
}
