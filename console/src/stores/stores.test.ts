import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest'
import { createPinia, setActivePinia } from 'pinia'
import { useSessionStore } from './session'
import { useKeysStore } from './keys'
import { useChatStore } from './chat'
import { json, sseResponse, stubFetch } from '../test/helpers'

const user = { id: 'u1', email: 'a@example.com', phone: null, display_name: 'A', role: 'admin', status: 'active', created_at_ms: 1 }
const me = { user, acting_as: { kind: 'user', id: 'u1' }, orgs: [], credential: { kind: 'session', session_id: 's1' } }
const unauthorized = () => json({ error: { message: 'sign in first', type: 'authentication_error', param: null, code: 'missing_credentials' } }, 401)

beforeEach(() => setActivePinia(createPinia()))
afterEach(() => vi.unstubAllGlobals())

describe('the session store', () => {
  it('knows nobody is signed in when the node answers 401', async () => {
    stubFetch({ 'GET /v1/auth/me': unauthorized })
    const session = useSessionStore()
    await session.load()
    expect(session.checked).toBe(true)
    expect(session.signedIn).toBe(false)
  })

  it('signs in, then reads the account the cookie belongs to', async () => {
    const { calls } = stubFetch({
      'POST /v1/auth/login': () => json({ token: 'maas_st_x', session_id: 's1', expires_at: 9, user }),
      'GET /v1/auth/me': () => json(me),
    })
    const session = useSessionStore()
    await session.signIn('a@example.com', 'pw')
    expect(calls.map((c) => `${c.method} ${c.path}`)).toEqual(['POST /v1/auth/login', 'GET /v1/auth/me'])
    expect(session.signedIn).toBe(true)
    expect(session.isAdmin).toBe(true)
  })

  it('keeps no account after a failed sign-in', async () => {
    stubFetch({ 'POST /v1/auth/login': unauthorized })
    const session = useSessionStore()
    await expect(session.signIn('a@example.com', 'wrong')).rejects.toMatchObject({ status: 401 })
    expect(session.signedIn).toBe(false)
  })

  it('forgets the account on sign-out even when the node refuses', async () => {
    stubFetch({ 'GET /v1/auth/me': () => json(me), 'POST /v1/auth/logout': unauthorized })
    const session = useSessionStore()
    await session.load()
    await session.signOut().catch(() => undefined)
    expect(session.signedIn).toBe(false)
  })

  it('rethrows errors other than 401 (the node is down, not the session)', async () => {
    stubFetch({ 'GET /v1/auth/me': () => json({ error: { message: 'store down', type: 'server_error', param: null, code: 'unavailable' } }, 503) })
    await expect(useSessionStore().load()).rejects.toMatchObject({ status: 503 })
  })
})

describe('the keys store', () => {
  const key = { id: 'k1', object: 'api_key', name: 'ci', prefix: 'sk-maas-ab', scopes: ['inference'], allowed_models: [], created_at: 1, expires_at: null, last_used_at: null, revoked_at: null, status: 'active' }

  it('shows a new key once and never lists its secret', async () => {
    stubFetch({ 'POST /v1/keys': () => json({ ...key, key: 'sk-maas-secret' }, 201), 'GET /v1/keys': () => json({ object: 'list', data: [] }) })
    const keys = useKeysStore()
    await keys.load()
    await keys.create({ name: 'ci' })
    expect(keys.newSecret).toBe('sk-maas-secret')
    expect(keys.keys).toHaveLength(1)
    expect(JSON.stringify(keys.keys)).not.toContain('sk-maas-secret')
    keys.dismissSecret()
    expect(keys.newSecret).toBeNull()
  })

  it('marks a revoked key as the API answers', async () => {
    stubFetch({ 'GET /v1/keys': () => json({ object: 'list', data: [key] }), 'DELETE /v1/keys/k1': () => json({ ...key, status: 'revoked', revoked_at: 2 }) })
    const keys = useKeysStore()
    await keys.load()
    await keys.revoke('k1')
    expect(keys.keys[0]?.status).toBe('revoked')
  })

  it('keeps the list when creating fails', async () => {
    stubFetch({
      'GET /v1/keys': () => json({ object: 'list', data: [key] }),
      'POST /v1/keys': () => json({ error: { message: 'expires_in_days must be at least 1', type: 'invalid_request_error', param: 'expires_in_days', code: 'invalid_expiry' } }, 400),
    })
    const keys = useKeysStore()
    await keys.load()
    await expect(keys.create({ name: 'x', expires_in_days: 0 })).rejects.toMatchObject({ code: 'invalid_expiry' })
    expect(keys.keys).toHaveLength(1)
    expect(keys.newSecret).toBeNull()
  })

  it('records a load error', async () => {
    stubFetch({ 'GET /v1/keys': unauthorized })
    const keys = useKeysStore()
    await keys.load()
    expect(keys.error).toMatchObject({ status: 401 })
  })
})

describe('the chat store', () => {
  const delta = (content: string) => JSON.stringify({ choices: [{ index: 0, delta: { content }, finish_reason: null }] })

  it('streams the answer into the conversation with the system prompt first', async () => {
    const { calls } = stubFetch({
      'POST /v1/chat/completions': () =>
        sseResponse([delta('Hel'), delta('lo'), JSON.stringify({ choices: [], usage: { prompt_tokens: 5, completion_tokens: 2 } }), '[DONE]']),
    })
    const chat = useChatStore()
    chat.params.model = 'tiny-llama'
    chat.params.system = 'Be brief'
    await chat.send('hi')
    expect(chat.messages).toEqual([
      { role: 'user', content: 'hi' },
      { role: 'assistant', content: 'Hello' },
    ])
    expect(chat.usage).toEqual({ prompt_tokens: 5, completion_tokens: 2 })
    expect(chat.streaming).toBe(false)
    expect(calls[0]?.body).toMatchObject({ messages: [{ role: 'system', content: 'Be brief' }, { role: 'user', content: 'hi' }] })
  })

  it('shows the error and drops the empty answer when the request fails', async () => {
    stubFetch({
      'POST /v1/chat/completions': () =>
        json({ error: { message: 'quota exceeded', type: 'rate_limit_error', param: null, code: 'quota_exceeded' } }, 429),
    })
    const chat = useChatStore()
    chat.params.model = 'tiny-llama'
    await chat.send('hi')
    expect(chat.error).toMatchObject({ status: 429 })
    expect(chat.messages).toEqual([{ role: 'user', content: 'hi' }])
  })

  it('sends nothing without a model or text', async () => {
    const { calls } = stubFetch({})
    const chat = useChatStore()
    await chat.send('hi')
    chat.params.model = 'tiny-llama'
    await chat.send('   ')
    expect(calls).toHaveLength(0)
  })
})
