// The caller's API keys: the list, and the secret of the key just created, which the API
// shows only once and this store keeps only until it is dismissed.
import { defineStore } from 'pinia'
import { ref } from 'vue'
import { api } from '../api/client'
import type { ApiKey, CreateKeyBody, List } from '../api/types'

export const useKeysStore = defineStore('keys', () => {
  const keys = ref<ApiKey[]>([])
  const loading = ref(false)
  const error = ref<unknown>(null)
  /** The secret of the key created last, until `dismissSecret()`. */
  const newSecret = ref<string | null>(null)

  async function load(): Promise<void> {
    loading.value = true
    error.value = null
    try {
      keys.value = (await api.get<List<ApiKey>>('/v1/keys')).data
    } catch (caught) {
      error.value = caught
    } finally {
      loading.value = false
    }
  }

  /** Creates a key; its secret is in `newSecret`, and never in the list. */
  async function create(body: CreateKeyBody): Promise<ApiKey> {
    const created = await api.post<ApiKey>('/v1/keys', body)
    newSecret.value = created.key ?? null
    const { key: _secret, ...listed } = created
    keys.value = [listed, ...keys.value.filter((k) => k.id !== created.id)]
    return listed
  }

  async function revoke(id: string): Promise<void> {
    const revoked = await api.delete<ApiKey>(`/v1/keys/${encodeURIComponent(id)}`)
    keys.value = keys.value.map((k) => (k.id === id ? revoked : k))
  }

  function dismissSecret(): void {
    newSecret.value = null
  }

  return { keys, loading, error, newSecret, load, create, revoke, dismissSecret }
})
