import { afterEach, describe, expect, it, vi } from 'vitest'
import { ApiError, api, onUnauthorized, withQuery } from './client'
import { json, stubFetch } from '../test/helpers'

afterEach(() => {
  vi.unstubAllGlobals()
  onUnauthorized(null)
})

describe('the API client', () => {
  it('sends JSON and reads JSON', async () => {
    const { calls } = stubFetch({ 'POST /v1/keys': () => json({ id: 'k1' }, 201) })
    const reply = await api.post<{ id: string }>('/v1/keys', { name: 'ci' })
    expect(reply.id).toBe('k1')
    expect(calls).toEqual([{ method: 'POST', path: '/v1/keys', body: { name: 'ci' } }])
  })

  it("turns the API's error body into an ApiError with its message, code and param", async () => {
    stubFetch({
      'POST /v1/auth/signup': () =>
        json({ error: { message: 'add another word or two', type: 'invalid_request_error', param: 'password', code: 'weak_password' } }, 400),
    })
    const error = await api.post('/v1/auth/signup', {}).catch((e: unknown) => e)
    expect(error).toBeInstanceOf(ApiError)
    expect(error).toMatchObject({ status: 400, code: 'weak_password', param: 'password', message: 'add another word or two' })
  })

  it('reads Retry-After on 429', async () => {
    stubFetch({
      'POST /v1/auth/login': () =>
        json({ error: { message: 'too many failed sign-ins', type: 'rate_limit_error', param: null, code: 'sign_in_throttled' } }, 429, { 'retry-after': '30' }),
    })
    await expect(api.post('/v1/auth/login', {})).rejects.toMatchObject({ status: 429, retryAfterSecs: 30 })
  })

  it('reports a node that cannot be reached as status 0', async () => {
    vi.stubGlobal('fetch', vi.fn(() => Promise.reject(new TypeError('Failed to fetch'))))
    await expect(api.get('/v1/models')).rejects.toMatchObject({ status: 0, code: 'network_error' })
  })

  it('tells the app about a 401', async () => {
    stubFetch({ 'GET /v1/keys': () => json({ error: { message: 'sign in', type: 'authentication_error', param: null, code: 'missing_credentials' } }, 401) })
    const seen: string[] = []
    onUnauthorized((error) => seen.push(error.code))
    await expect(api.get('/v1/keys')).rejects.toBeInstanceOf(ApiError)
    expect(seen).toEqual(['missing_credentials'])
  })

  it('keeps an error without a JSON body readable', async () => {
    vi.stubGlobal('fetch', vi.fn(async () => new Response('bad gateway', { status: 502, statusText: 'Bad Gateway' })))
    await expect(api.get('/v1/models')).rejects.toMatchObject({ status: 502, message: 'Bad Gateway' })
  })

  it('builds query strings without empty values', () => {
    expect(withQuery('/v1/usage', { days: 7, since: undefined, action: '' })).toBe('/v1/usage?days=7')
    expect(withQuery('/v1/usage')).toBe('/v1/usage')
  })
})
