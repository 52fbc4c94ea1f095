// The knowledge graph as an ECharts `graph` series: entities are nodes sized by their
// mentions, relations are edges as wide as their weight.
import type { EChartsCoreOption } from 'echarts/core'
import type { KnowledgeGraph } from '../../api/types'

export interface GraphNode {
  id: string
  name: string
  value: number
  symbolSize: number
  category: number
  itemStyle?: { borderColor: string; borderWidth: number }
}

export interface GraphLink {
  source: string
  target: string
  value: number
  lineStyle: { width: number }
}

/** Node size from mentions: 12 px for one, growing with the log, at most 60 px. */
export function nodeSize(mentions: number, most: number): number {
  if (most <= 1) return 20
  const scaled = Math.log(Math.max(1, mentions)) / Math.log(most)
  return Math.round(12 + scaled * 48)
}

export function graphData(graph: KnowledgeGraph, selected: string | null = null): { nodes: GraphNode[]; links: GraphLink[]; kinds: string[] } {
  const kinds = [...new Set(graph.entities.map((e) => e.kind || 'entity'))].sort()
  const most = Math.max(1, ...graph.entities.map((e) => e.mentions))
  const keys = new Set(graph.entities.map((e) => e.key))
  const nodes: GraphNode[] = graph.entities.map((entity) => ({
    id: entity.key,
    name: entity.name,
    value: entity.mentions,
    symbolSize: nodeSize(entity.mentions, most),
    category: kinds.indexOf(entity.kind || 'entity'),
    ...(entity.key === selected ? { itemStyle: { borderColor: '#303133', borderWidth: 3 } } : {}),
  }))
  const heaviest = Math.max(1, ...graph.relations.map((r) => r.weight))
  const links: GraphLink[] = graph.relations
    .filter((relation) => keys.has(relation.source) && keys.has(relation.target) && relation.source !== relation.target)
    .map((relation) => ({
      source: relation.source,
      target: relation.target,
      value: relation.weight,
      lineStyle: { width: 1 + Math.round((relation.weight / heaviest) * 4) },
    }))
  return { nodes, links, kinds }
}

export function graphOption(graph: KnowledgeGraph, selected: string | null = null): EChartsCoreOption {
  const { nodes, links, kinds } = graphData(graph, selected)
  return {
    tooltip: { trigger: 'item' },
    legend: kinds.length > 1 ? [{ data: kinds, bottom: 0 }] : [],
    series: [
      {
        type: 'graph',
        layout: 'force',
        roam: true,
        draggable: true,
        data: nodes,
        links,
        categories: kinds.map((name) => ({ name })),
        label: { show: true, position: 'right', fontSize: 11 },
        labelLayout: { hideOverlap: true },
        force: { repulsion: 120, edgeLength: [40, 120], gravity: 0.1 },
        lineStyle: { color: 'source', opacity: 0.6, curveness: 0.1 },
        emphasis: { focus: 'adjacency' },
      },
    ],
  }
}
