import { afterEach, describe, expect, it, vi } from 'vitest'
import { flushPromises, mount } from '@vue/test-utils'
import DeploymentLogs from './DeploymentLogs.vue'
import { json, plugins, stubFetch } from '../../test/helpers'

const line = (seq: number, level: 'info' | 'warn' | 'error', message: string) => ({
  at_ms: 1_733_390_000_000 + seq,
  node_id: 2,
  seq,
  replica_id: 'tiny-llama-r1',
  level,
  message,
})

describe('a deployment log', () => {
  afterEach(() => vi.unstubAllGlobals())

  it('lists the lines oldest first, marks their levels, and asks again at another level', async () => {
    const { calls } = stubFetch({
      'GET /v1/deployments/tiny-llama/logs': (_init, url) =>
        json({
          deployment: 'tiny-llama',
          nodes: [1, 2],
          nodes_missing: [3],
          lines: url.includes('level=error')
            ? [line(2, 'error', 'failed to load: the file is truncated')]
            : [line(1, 'info', 'starting on node 2 on the CPU'), line(2, 'error', 'failed to load: the file is truncated')],
        }),
    })
    const logs = mount(DeploymentLogs, { props: { deploymentId: 'tiny-llama' }, global: { plugins: plugins() } })
    await flushPromises()
    const items = logs.findAll('[role="log"] li')
    expect(items.map((item) => item.classes())).toEqual([expect.arrayContaining(['level-info']), expect.arrayContaining(['level-error'])])
    expect(items[0]?.text()).toContain('Node 2 · tiny-llama-r1')
    expect(items[1]?.text()).toContain('failed to load: the file is truncated')
    expect(logs.text()).toContain('Nodes 3 did not answer')
    expect(calls.at(-1)?.path).toBe('/v1/deployments/tiny-llama/logs')

    const select = logs.findComponent({ name: 'ElSelect' })
    select.vm.$emit('update:modelValue', 'error')
    await flushPromises()
    expect(logs.findAll('[role="log"] li')).toHaveLength(1)
    logs.unmount()
  })

  it('says when nothing is logged yet', async () => {
    stubFetch({
      'GET /v1/deployments/new/logs': () => json({ deployment: 'new', nodes: [1], nodes_missing: [], lines: [] }),
    })
    const logs = mount(DeploymentLogs, { props: { deploymentId: 'new' }, global: { plugins: plugins() } })
    await flushPromises()
    expect(logs.text()).toContain('Nothing logged yet.')
    expect(logs.find('[role="log"]').exists()).toBe(false)
    logs.unmount()
  })
})
