// Chart options for a deployment's monitoring figures (GET /v1/deployments/{id}/metrics):
// pure functions of the points, so they are tested without a browser.
import type { MetricsPoint } from '../../api/types'

type Translate = (key: string) => string
/** An ECharts option (the shape `Chart.vue` takes). */
export type ChartOption = Record<string, unknown>

/** `HH:MM:SS` of a bucket's start, in the browser's time zone. */
export function bucketLabel(atMs: number): string {
  return new Date(atMs).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit', hour12: false })
}

/** Totals over the points: requests, errors, tokens, and the worst p99. */
export function totals(points: readonly MetricsPoint[]): { requests: number; errors: number; tokens: number; worstP99: number | null } {
  let requests = 0
  let errors = 0
  let tokens = 0
  let worstP99: number | null = null
  for (const p of points) {
    requests += p.requests
    errors += p.errors
    tokens += p.prompt_tokens + p.completion_tokens
    if (p.latency_p99_ms != null) worstP99 = Math.max(worstP99 ?? 0, p.latency_p99_ms)
  }
  return { requests, errors, tokens, worstP99 }
}

const base = (points: readonly MetricsPoint[]) => ({
  animationDuration: 300,
  tooltip: { trigger: 'axis' },
  legend: { top: 0, type: 'scroll' },
  grid: { left: 50, right: 20, top: 40, bottom: 30 },
  xAxis: { type: 'category', data: points.map((p) => bucketLabel(p.at_ms)) },
})

/** Generated tokens per second (line) and requests per bucket with their errors (bars). */
export function throughputChart(points: readonly MetricsPoint[], t: Translate): ChartOption {
  return {
    ...base(points),
    yAxis: [{ type: 'value', name: t('deployments.tokensPerSecond') }, { type: 'value', name: t('deployments.requests') }],
    series: [
      { name: t('deployments.tokensPerSecond'), type: 'line', smooth: true, showSymbol: false, data: points.map((p) => round(p.tokens_per_second)) },
      { name: t('deployments.requests'), type: 'bar', yAxisIndex: 1, data: points.map((p) => p.requests - p.errors) },
      { name: t('deployments.errors'), type: 'bar', yAxisIndex: 1, data: points.map((p) => p.errors) },
    ],
  }
}

/** Latency p50 and p99 (milliseconds; gaps where a bucket had no requests). */
export function latencyChart(points: readonly MetricsPoint[], t: Translate): ChartOption {
  return {
    ...base(points),
    yAxis: { type: 'value', name: 'ms' },
    series: [
      { name: 'p50', type: 'line', connectNulls: false, data: points.map((p) => p.latency_p50_ms ?? null) },
      { name: 'p99', type: 'line', connectNulls: false, data: points.map((p) => p.latency_p99_ms ?? null) },
    ].map((s) => ({ ...s, name: `${t('deployments.latency')} ${s.name}` })),
  }
}

/** Queued requests and active sequences over the replicas. */
export function loadChart(points: readonly MetricsPoint[], t: Translate): ChartOption {
  return {
    ...base(points),
    yAxis: { type: 'value' },
    series: [
      { name: t('deployments.queueDepth'), type: 'line', smooth: true, showSymbol: false, data: points.map((p) => round(p.queue_depth)) },
      { name: t('deployments.activeSequences'), type: 'line', smooth: true, showSymbol: false, data: points.map((p) => round(p.active_sequences)) },
    ],
  }
}

/** Whether the deployment held GPU memory at any point (replicas on CPU hold none). */
export function onGpus(points: readonly MetricsPoint[]): boolean {
  return points.some((p) => p.gpu_memory_mib > 0)
}

/** GPU memory held (MiB) and, where the driver measures it, the GPUs' utilization (%). */
export function gpuChart(points: readonly MetricsPoint[], t: Translate): ChartOption {
  return {
    ...base(points),
    yAxis: [
      { type: 'value', name: 'MiB' },
      { type: 'value', name: '%', min: 0, max: 100 },
    ],
    series: [
      { name: t('deployments.gpuMemory'), type: 'line', step: 'end', showSymbol: false, data: points.map((p) => round(p.gpu_memory_mib)) },
      {
        name: t('deployments.gpuUtilization'),
        type: 'line',
        yAxisIndex: 1,
        connectNulls: false,
        showSymbol: false,
        data: points.map((p) => (p.gpu_utilization_percent == null ? null : round(p.gpu_utilization_percent))),
      },
    ],
  }
}

function round(value: number): number {
  return Math.round(value * 100) / 100
}
