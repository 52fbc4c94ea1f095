import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest'
import { flushPromises, mount } from '@vue/test-utils'
import { createPinia, setActivePinia } from 'pinia'
import { routerKey } from 'vue-router'
import CitationList from './CitationList.vue'
import { graphData, nodeSize } from './graph'
import { pagesText } from './format'
import { uploadDocument } from '../../api/upload'
import { applyEvent } from '../../api/sse'
import { ingestPercent, isPending, POLL_MS, useKnowledgeStore } from '../../stores/knowledge'
import { useChatStore } from '../../stores/chat'
import type { Citation, KnowledgeDocument } from '../../api/types'
import { FakeXhr, json, plugins, sseResponse, stubFetch } from '../../test/helpers'

function doc(over: Partial<KnowledgeDocument> = {}): KnowledgeDocument {
  return {
    id: 'doc_1',
    object: 'knowledge_base.document',
    knowledge_base_id: 'kb_1',
    filename: 'guide.md',
    version: 1,
    kind: 'markdown',
    sha256: 'a'.repeat(64),
    bytes: 120,
    tags: [],
    category: '',
    state: 'queued',
    error: null,
    attempts: 0,
    pages: 1,
    chunks_total: 0,
    chunks_embedded: 0,
    progress: 0,
    created_at: 1,
    updated_at: 1,
    ...over,
  }
}

const citation: Citation = {
  index: 1,
  knowledge_base_id: 'kb_1',
  document_id: 'doc_1',
  filename: 'guide.md',
  version: 2,
  page_start: 3,
  page_end: 4,
  heading_path: ['Setup', 'Reset'],
  chunk_id: '42',
  score: 0.8123,
  text: 'Hold the button for ten seconds.',
}

beforeEach(() => setActivePinia(createPinia()))
afterEach(() => {
  vi.useRealTimers()
  vi.unstubAllGlobals()
  FakeXhr.reset()
})

describe('the citation list', () => {
  it('numbers each source with its file, version, pages, headings and score; the text opens on demand', () => {
    const list = mount(CitationList, { props: { citations: [citation, { ...citation, index: 2, page_start: 0, page_end: 0, heading_path: [], chunk_id: '7' }] }, global: { plugins: plugins() } })
    const items = list.findAll('[data-test="citation"]')
    expect(items).toHaveLength(2)
    const first = items[0]!.text()
    expect(first).toContain('[1]')
    expect(first).toContain('guide.md v2')
    expect(first).toContain('p. 3–4')
    expect(first).toContain('Setup › Reset')
    expect(first).toContain('0.812')
    expect(items[0]!.element.tagName).toBe('DETAILS')
    expect(items[0]!.find('.text').text()).toBe('Hold the button for ten seconds.')
    expect(items[1]!.text()).not.toContain('p.')
  })

  it('says so when no source matched', () => {
    const list = mount(CitationList, { props: { citations: [] }, global: { plugins: plugins() } })
    expect(list.text()).toContain('No source matched')
  })

  it('formats page ranges', () => {
    expect(pagesText({ page_start: 2, page_end: 2 })).toBe('2')
    expect(pagesText({ page_start: 0, page_end: 0 })).toBe('')
  })
})

describe('uploading a document', () => {
  it('reports upload progress, then resolves with the document', async () => {
    vi.stubGlobal('XMLHttpRequest', FakeXhr)
    const seen: number[] = []
    const file = new File(['# Guide\nhello'], 'guide.md', { type: 'text/markdown' })
    const handle = uploadDocument('kb 1', { file, tags: 'a, b', category: 'manual' }, (f) => seen.push(f))
    const xhr = FakeXhr.last!
    expect(xhr.method).toBe('POST')
    expect(xhr.url).toBe('/v1/knowledge_bases/kb%201/documents')
    expect(xhr.withCredentials).toBe(true)
    const form = xhr.body as FormData
    expect(form).toBeInstanceOf(FormData)
    expect((form.get('file') as File).name).toBe('guide.md')
    expect(form.get('tags')).toBe('a, b')
    expect(form.get('category')).toBe('manual')
    xhr.progress(25, 100)
    xhr.progress(100, 100)
    xhr.answer(200, doc())
    await expect(handle.promise).resolves.toMatchObject({ id: 'doc_1', state: 'queued' })
    expect(seen).toEqual([0.25, 1, 1])
  })

  it("turns the API's error into an ApiError", async () => {
    vi.stubGlobal('XMLHttpRequest', FakeXhr)
    const handle = uploadDocument('kb_1', { file: new File(['x'], 'big.pdf') }, () => undefined)
    FakeXhr.last!.answer(413, { error: { message: 'the file is larger than 50 MiB', code: 'file_too_large', param: 'file' } })
    await expect(handle.promise).rejects.toMatchObject({ status: 413, code: 'file_too_large', message: 'the file is larger than 50 MiB', param: 'file' })
  })
})

describe('the knowledge store', () => {
  it('knows which states are pending and how far ingestion is', () => {
    expect(isPending({ state: 'embedding' })).toBe(true)
    expect(isPending({ state: 'indexed' })).toBe(false)
    expect(isPending({ state: 'failed' })).toBe(false)
    expect(ingestPercent({ state: 'embedding', progress: 0.5, chunks_total: 4, chunks_embedded: 2 })).toBe(50)
    expect(ingestPercent({ state: 'embedding', progress: 0, chunks_total: 4, chunks_embedded: 1 })).toBe(25)
    expect(ingestPercent({ state: 'indexed', progress: 0, chunks_total: 0, chunks_embedded: 0 })).toBe(100)
  })

  it('shows the upload percentage, then polls the documents until none is pending', async () => {
    vi.useFakeTimers()
    vi.stubGlobal('XMLHttpRequest', FakeXhr)
    const states = [[doc({ state: 'embedding', progress: 0.5, chunks_total: 2, chunks_embedded: 1 })], [doc({ state: 'indexed', progress: 1, chunks_total: 2, chunks_embedded: 2 })]]
    let listCalls = 0
    stubFetch({
      'GET /v1/knowledge_bases/kb_1/documents': () => {
        listCalls += 1
        return json({ object: 'list', data: listCalls === 1 ? [] : (states[Math.min(listCalls - 2, 1)] ?? []) })
      },
    })
    const store = useKnowledgeStore()
    await store.open('kb_1')
    expect(listCalls).toBe(1)
    expect(store.documents).toEqual([])

    const uploaded = store.upload(new File(['hello'], 'guide.md'))
    FakeXhr.last!.progress(1, 2)
    expect(store.uploads[0]?.percent).toBe(50)
    FakeXhr.last!.answer(200, doc())
    await uploaded
    expect(store.uploads).toEqual([])
    expect(store.documents[0]?.state).toBe('queued')
    expect(store.pending).toBe(true)

    await vi.advanceTimersByTimeAsync(POLL_MS)
    expect(listCalls).toBe(2)
    expect(store.documents[0]?.state).toBe('embedding')
    await vi.advanceTimersByTimeAsync(POLL_MS)
    expect(listCalls).toBe(3)
    expect(store.documents[0]?.state).toBe('indexed')
    await vi.advanceTimersByTimeAsync(POLL_MS * 3)
    expect(listCalls).toBe(3)
    store.close()
  })

  it('keeps a failed upload with its error until dismissed', async () => {
    vi.stubGlobal('XMLHttpRequest', FakeXhr)
    stubFetch({ 'GET /v1/knowledge_bases/kb_1/documents': () => json({ object: 'list', data: [] }) })
    const store = useKnowledgeStore()
    await store.open('kb_1')
    const uploaded = store.upload(new File(['x'], 'scan.pdf'))
    FakeXhr.last!.answer(400, { error: { message: 'unsupported file', code: 'invalid_file', param: 'file' } })
    expect(await uploaded).toBeNull()
    expect(store.uploads[0]?.error).toMatchObject({ message: 'unsupported file' })
    store.dismissUpload(store.uploads[0]!.key)
    expect(store.uploads).toEqual([])
    store.close()
  })
})

describe('the knowledge graph', () => {
  it('maps entities to nodes sized by mentions and relations to edges between known entities', () => {
    const { nodes, links, kinds } = graphData(
      {
        object: 'knowledge_base.graph',
        entities: [
          { key: 'acme', name: 'Acme', kind: 'org', mentions: 10, documents: 2 },
          { key: 'bob', name: 'Bob', kind: 'person', mentions: 1, documents: 1 },
        ],
        relations: [
          { source: 'acme', target: 'bob', weight: 3, evidence: 'Bob works at Acme' },
          { source: 'acme', target: 'ghost', weight: 1, evidence: '' },
          { source: 'bob', target: 'bob', weight: 1, evidence: '' },
        ],
      },
      'bob',
    )
    expect(kinds).toEqual(['org', 'person'])
    expect(nodes.map((n) => [n.id, n.name, n.value, n.category])).toEqual([
      ['acme', 'Acme', 10, 0],
      ['bob', 'Bob', 1, 1],
    ])
    expect(nodes[0]!.symbolSize).toBeGreaterThan(nodes[1]!.symbolSize)
    expect(nodes[1]!.itemStyle?.borderWidth).toBe(3)
    expect(links).toEqual([{ source: 'acme', target: 'bob', value: 3, lineStyle: { width: 5 } }])
    expect(nodeSize(1, 1)).toBe(20)
    expect(nodeSize(100, 100)).toBe(60)
  })
})

describe('answers from knowledge bases', () => {
  it('reads the citations from the first event of the stream', () => {
    const onCitations = vi.fn()
    applyEvent(JSON.stringify({ choices: [{ delta: { role: 'assistant' } }], citations: [citation], retrieval_query: 'reset?' }), { onDelta: () => undefined, onCitations })
    expect(onCitations).toHaveBeenCalledWith([citation], 'reset?')
  })

  it('sends the chosen knowledge bases and keeps the sources with the answer', async () => {
    const { calls } = stubFetch({
      'POST /v1/chat/completions': () =>
        sseResponse([
          JSON.stringify({ choices: [{ delta: { role: 'assistant', content: '' } }], citations: [citation], retrieval_query: 'how to reset' }),
          JSON.stringify({ choices: [{ delta: { content: 'Hold it [1].' } }] }),
          '[DONE]',
        ]),
    })
    const chat = useChatStore()
    chat.params.model = 'tiny-llama'
    chat.knowledge.ids = ['kb_1']
    await chat.send('how do I reset?')
    expect(calls[0]?.body).toMatchObject({ knowledge_base_ids: ['kb_1'], retrieval: { top_k: 5, mode: 'hybrid' } })
    expect(chat.messages[1]?.content).toBe('Hold it [1].')
    expect(chat.citations[1]).toEqual([citation])
    expect(chat.retrievalQuery).toBe('how to reset')
    chat.knowledge.ids = []
    await chat.send('again')
    expect(calls[1]?.body).not.toHaveProperty('knowledge_base_ids')
  })
})

describe('the knowledge-base list page', () => {
  it('lists knowledge bases and says when there are none', async () => {
    const { default: KnowledgeBases } = await import('../../views/KnowledgeBases.vue')
    stubFetch({ 'GET /v1/knowledge_bases': () => json({ object: 'list', data: [] }) })
    const page = mount(KnowledgeBases, { global: { plugins: plugins(), stubs: { RouterLink: true }, provide: { [routerKey as symbol]: { push: vi.fn() } } } })
    await flushPromises()
    expect(page.text()).toContain('No knowledge bases yet')
  })
})
