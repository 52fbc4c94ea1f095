// The playground's conversation: parameters, messages, and the answer streaming in.
import { defineStore } from 'pinia'
import { reactive, ref } from 'vue'
import { streamChat, type StreamUsage } from '../api/sse'
import type { ChatMessage, Citation, RetrievalMode } from '../api/types'

export const useChatStore = defineStore('chat', () => {
  const params = reactive({ model: '', system: '', temperature: 0.7, top_p: 1, max_tokens: 256 })
  /** Knowledge bases to answer from (none: a plain chat), and how to retrieve from them. */
  const knowledge = reactive({ ids: [] as string[], top_k: 5, mode: 'hybrid' as RetrievalMode })
  /** The sources of each answer, by the answer's index in `messages`. */
  const citations = ref<Record<number, Citation[]>>({})
  const retrievalQuery = ref<string | null>(null)
  const messages = ref<ChatMessage[]>([])
  const streaming = ref(false)
  const error = ref<unknown>(null)
  const usage = ref<StreamUsage | null>(null)
  let controller: AbortController | null = null

  /** Sends `text` with the conversation so far and streams the answer into the last message. */
  async function send(text: string): Promise<void> {
    if (!text.trim() || streaming.value || !params.model) return
    error.value = null
    usage.value = null
    retrievalQuery.value = null
    messages.value.push({ role: 'user', content: text })
    const history: ChatMessage[] = [
      ...(params.system.trim() ? [{ role: 'system' as const, content: params.system }] : []),
      ...messages.value,
    ]
    messages.value.push({ role: 'assistant', content: '' })
    const answerIndex = messages.value.length - 1
    const answer = messages.value[answerIndex] as ChatMessage
    const rag = knowledge.ids.length > 0
    streaming.value = true
    controller = new AbortController()
    try {
      await streamChat(
        {
          model: params.model,
          messages: history,
          temperature: params.temperature,
          top_p: params.top_p,
          max_tokens: params.max_tokens,
          ...(rag ? { knowledge_base_ids: [...knowledge.ids], retrieval: { top_k: knowledge.top_k, mode: knowledge.mode } } : {}),
        },
        {
          onDelta: (delta) => {
            answer.content += delta
          },
          onUsage: (value) => {
            usage.value = value
          },
          onCitations: (sources, query) => {
            citations.value = { ...citations.value, [answerIndex]: sources }
            retrievalQuery.value = query
          },
        },
        controller.signal,
      )
    } catch (caught) {
      error.value = caught
      if (!answer.content) {
        messages.value.pop()
        const rest = { ...citations.value }
        delete rest[answerIndex]
        citations.value = rest
      }
    } finally {
      streaming.value = false
      controller = null
    }
  }

  function stop(): void {
    controller?.abort()
  }

  function clear(): void {
    stop()
    messages.value = []
    citations.value = {}
    retrievalQuery.value = null
    usage.value = null
    error.value = null
  }

  return { params, knowledge, citations, retrievalQuery, messages, streaming, error, usage, send, stop, clear }
})
