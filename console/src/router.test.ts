import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest'
import { createPinia, setActivePinia } from 'pinia'
import { makeRouter } from './router'
import { json, stubFetch } from './test/helpers'

const user = (role: string) => ({
  user: { id: 'u1', email: 'a@example.com', phone: null, display_name: 'A', role, status: 'active', created_at_ms: 1 },
  acting_as: { kind: 'user', id: 'u1' },
  orgs: [],
  credential: { kind: 'session', session_id: 's1' },
})
const unauthorized = () => json({ error: { message: 'sign in', type: 'authentication_error', param: null, code: 'missing_credentials' } }, 401)

beforeEach(() => setActivePinia(createPinia()))
afterEach(() => vi.unstubAllGlobals())

describe('the router', () => {
  it('sends a visitor who is not signed in to the sign-in page, remembering where to', async () => {
    stubFetch({ 'GET /v1/auth/me': unauthorized })
    const router = makeRouter(true)
    await router.push('/keys')
    expect(router.currentRoute.value.name).toBe('signin')
    expect(router.currentRoute.value.query.next).toBe('/keys')
  })

  it('lets public pages through without a session', async () => {
    stubFetch({ 'GET /v1/auth/me': unauthorized })
    const router = makeRouter(true)
    await router.push('/signup')
    expect(router.currentRoute.value.name).toBe('signup')
  })

  it('keeps administration pages from users who are not administrators', async () => {
    stubFetch({ 'GET /v1/auth/me': () => json(user('user')) })
    const router = makeRouter(true)
    await router.push('/admin/cluster')
    expect(router.currentRoute.value.name).toBe('home')
  })

  it('opens administration pages to administrators, and skips sign-in when signed in', async () => {
    stubFetch({ 'GET /v1/auth/me': () => json(user('admin')) })
    const router = makeRouter(true)
    await router.push('/admin/cluster')
    expect(router.currentRoute.value.name).toBe('cluster')
    await router.push('/signin')
    expect(router.currentRoute.value.name).toBe('home')
  })

  it('shows the sign-in page when the node cannot be reached', async () => {
    vi.stubGlobal('fetch', vi.fn(() => Promise.reject(new TypeError('Failed to fetch'))))
    const router = makeRouter(true)
    await router.push('/')
    expect(router.currentRoute.value.name).toBe('signin')
  })
})
