import { describe, expect, it } from 'vitest'
import type { MetricsPoint } from '../../api/types'
import { gpuChart, latencyChart, loadChart, onGpus, throughputChart, totals } from './metrics'

const t = (key: string) => key
const point = (at: number, fields: Partial<MetricsPoint> = {}): MetricsPoint => ({
  at_ms: at,
  requests: 0,
  errors: 0,
  prompt_tokens: 0,
  completion_tokens: 0,
  latency_p50_ms: null,
  latency_p99_ms: null,
  tokens_per_second: 0,
  queue_depth: 0,
  active_sequences: 0,
  gpu_memory_mib: 0,
  gpu_utilization_percent: null,
  ...fields,
})

type Series = { name: string; data: (number | null)[] }
const series = (option: object) => (option as { series: Series[] }).series

describe('deployment metrics', () => {
  const points = [
    point(0, { requests: 4, errors: 1, prompt_tokens: 30, completion_tokens: 12, latency_p50_ms: 20, latency_p99_ms: 200, tokens_per_second: 12.345 }),
    point(10_000),
    point(20_000, { requests: 2, prompt_tokens: 5, completion_tokens: 5, latency_p50_ms: 5, latency_p99_ms: 50, queue_depth: 1.5, active_sequences: 2 }),
  ]

  it('adds up requests, errors and tokens and keeps the worst p99', () => {
    expect(totals(points)).toEqual({ requests: 6, errors: 1, tokens: 52, worstP99: 200 })
    expect(totals([point(0)])).toEqual({ requests: 0, errors: 0, tokens: 0, worstP99: null })
  })

  it('splits answered requests from errors and rounds the rates', () => {
    const [rate, answered, errors] = series(throughputChart(points, t))
    expect(rate?.data).toEqual([12.35, 0, 0])
    expect(answered?.data).toEqual([3, 0, 2])
    expect(errors?.data).toEqual([1, 0, 0])
  })

  it('leaves gaps in latency where a bucket had no requests', () => {
    const [p50, p99] = series(latencyChart(points, t))
    expect(p50?.data).toEqual([20, null, 5])
    expect(p99?.data).toEqual([200, null, 50])
    expect(p99?.name).toBe('deployments.latency p99')
  })

  it('charts the queue and the active sequences', () => {
    const [queue, active] = series(loadChart(points, t))
    expect(queue?.data).toEqual([0, 0, 1.5])
    expect(active?.data).toEqual([0, 0, 2])
    const axis = (loadChart(points, t) as { xAxis: { data: string[] } }).xAxis.data
    expect(axis).toHaveLength(3)
  })

  it('charts GPU memory held and, where measured, utilization; replicas on CPU have no GPU chart', () => {
    expect(onGpus(points)).toBe(false)
    const gpuPoints = [point(0, { gpu_memory_mib: 531 }), point(10_000, { gpu_memory_mib: 1062, gpu_utilization_percent: 37.256 }), point(20_000)]
    expect(onGpus(gpuPoints)).toBe(true)
    const [memory, utilization] = series(gpuChart(gpuPoints, t))
    expect(memory?.name).toBe('deployments.gpuMemory')
    expect(memory?.data).toEqual([531, 1062, 0])
    expect(utilization?.data).toEqual([null, 37.26, null])
  })
})
