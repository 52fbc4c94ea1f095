// The repository tab's model list: versions grouped by model. A model is an owner's name:
// the platform's `tiny` and a tenant's own `tiny` are two models.
import type { ModelVersion } from '../../api/types'

export interface RepositoryModel {
  /** Unique per owner and name. */
  key: string
  name: string
  /** Newest first. */
  versions: ModelVersion[]
  latest: ModelVersion
}

/** Groups versions (newest first within a model, as the node lists them) by model. */
export function groupByModel(versions: readonly ModelVersion[]): RepositoryModel[] {
  const groups = new Map<string, RepositoryModel>()
  for (const version of versions) {
    const key = `${version.owner_kind}:${version.owner_id}:${version.name}`
    const group = groups.get(key)
    if (group) group.versions.push(version)
    else groups.set(key, { key, name: version.name, versions: [version], latest: version })
  }
  return [...groups.values()]
}

/**
 * The versions a deployment by this user would run: administrators deploy the platform's
 * models; anyone else's own model shadows the platform's of the same name (as the node
 * resolves it).
 */
export function deployableVersions(versions: readonly ModelVersion[], admin: boolean): ModelVersion[] {
  if (admin) return versions.filter((v) => v.owner_kind === 'platform')
  const own = new Set(versions.filter((v) => v.owner_kind !== 'platform').map((v) => v.name))
  return versions.filter((v) => (v.owner_kind === 'platform') !== own.has(v.name))
}
