// Who is signed in. The session itself is the HTTP-only `maas_session` cookie that
// POST /v1/auth/login sets; this store only remembers the account it belongs to.
import { defineStore } from 'pinia'
import { computed, ref } from 'vue'
import { ApiError, api } from '../api/client'
import type { Me, SignInReply, User } from '../api/types'

export const useSessionStore = defineStore('session', () => {
  const me = ref<Me | null>(null)
  /** Whether GET /v1/auth/me has answered once (signed in or not). */
  const checked = ref(false)

  const user = computed<User | null>(() => me.value?.user ?? null)
  const signedIn = computed(() => user.value !== null)
  const isAdmin = computed(() => user.value?.role === 'admin')
  /** Administrators deploy for the platform; enterprise accounts deploy private models. */
  const canDeploy = computed(() => user.value?.role === 'admin' || user.value?.role === 'enterprise')

  /** Asks the node who the cookie belongs to; a 401 means nobody. */
  async function load(): Promise<void> {
    try {
      me.value = await api.get<Me>('/v1/auth/me')
    } catch (error) {
      if (!(error instanceof ApiError) || (error.status !== 401 && error.status !== 403)) throw error
      me.value = null
    } finally {
      checked.value = true
    }
  }

  async function signIn(login: string, password: string): Promise<void> {
    await api.post<SignInReply>('/v1/auth/login', { login, password })
    await load()
  }

  async function signOut(): Promise<void> {
    try {
      await api.post('/v1/auth/logout')
    } finally {
      forget()
    }
  }

  /** Drops the account without asking the node (the session ended elsewhere). */
  function forget(): void {
    me.value = null
    checked.value = true
  }

  return { me, checked, user, signedIn, isAdmin, canDeploy, load, signIn, signOut, forget }
})
