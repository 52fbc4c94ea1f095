import { createRouter, createWebHistory, createMemoryHistory, type RouteRecordRaw } from 'vue-router'
import { useSessionStore } from './stores/session'

declare module 'vue-router' {
  interface RouteMeta {
    /** Reachable without signing in (sign-in, sign-up, verification, reset). */
    public?: boolean
    /** Only for administrators. */
    admin?: boolean
    /** The i18n key of the page's title. */
    title?: string
  }
}

export const routes: RouteRecordRaw[] = [
  { path: '/signin', name: 'signin', component: () => import('./views/auth/SignIn.vue'), meta: { public: true, title: 'auth.signIn' } },
  { path: '/signup', name: 'signup', component: () => import('./views/auth/SignUp.vue'), meta: { public: true, title: 'auth.signUp' } },
  { path: '/verify', name: 'verify', component: () => import('./views/auth/Verify.vue'), meta: { public: true, title: 'auth.verify' } },
  { path: '/reset', name: 'reset', component: () => import('./views/auth/ResetPassword.vue'), meta: { public: true, title: 'auth.reset' } },
  { path: '/', name: 'home', component: () => import('./views/Home.vue'), meta: { title: 'nav.home' } },
  { path: '/playground', name: 'playground', component: () => import('./views/Playground.vue'), meta: { title: 'nav.playground' } },
  { path: '/models', name: 'models', component: () => import('./views/Models.vue'), meta: { title: 'nav.models' } },
  { path: '/deployments', name: 'deployments', component: () => import('./views/Deployments.vue'), meta: { title: 'nav.deployments' } },
  { path: '/knowledge', name: 'knowledge', component: () => import('./views/KnowledgeBases.vue'), meta: { title: 'nav.knowledge' } },
  { path: '/knowledge/:id', name: 'knowledge-base', component: () => import('./views/KnowledgeBase.vue'), meta: { title: 'nav.knowledge' } },
  { path: '/fine-tuning', name: 'fine-tuning', component: () => import('./views/FineTuning.vue'), meta: { title: 'nav.fineTuning' } },
  { path: '/keys', name: 'keys', component: () => import('./views/Keys.vue'), meta: { title: 'nav.keys' } },
  { path: '/usage', name: 'usage', component: () => import('./views/Usage.vue'), meta: { title: 'nav.usage' } },
  { path: '/orgs', name: 'orgs', component: () => import('./views/Orgs.vue'), meta: { title: 'nav.orgs' } },
  { path: '/profile', name: 'profile', component: () => import('./views/Profile.vue'), meta: { title: 'nav.profile' } },
  { path: '/admin/cluster', name: 'cluster', component: () => import('./views/admin/Cluster.vue'), meta: { admin: true, title: 'nav.cluster' } },
  { path: '/admin/users', name: 'users', component: () => import('./views/admin/Users.vue'), meta: { admin: true, title: 'nav.users' } },
  { path: '/admin/prices', name: 'prices', component: () => import('./views/admin/Prices.vue'), meta: { admin: true, title: 'nav.prices' } },
  { path: '/admin/audit', name: 'audit', component: () => import('./views/admin/Audit.vue'), meta: { admin: true, title: 'nav.audit' } },
  { path: '/admin/outbox', name: 'outbox', component: () => import('./views/admin/Outbox.vue'), meta: { admin: true, title: 'nav.outbox' } },
  { path: '/:rest(.*)*', name: 'not-found', component: () => import('./views/NotFound.vue'), meta: { public: true } },
]

export function makeRouter(memory = false) {
  const router = createRouter({ history: memory ? createMemoryHistory() : createWebHistory(), routes })
  router.beforeEach(async (to) => {
    const session = useSessionStore()
    if (!session.checked) {
      try {
        await session.load()
      } catch {
        // The node is unreachable: let public pages show, and the sign-in page say so.
      }
    }
    if (!to.meta.public && !session.signedIn) return { name: 'signin', query: to.fullPath === '/' ? {} : { next: to.fullPath } }
    if (to.meta.admin && !session.isAdmin) return { name: 'home' }
    if ((to.name === 'signin' || to.name === 'signup') && session.signedIn) return { name: 'home' }
    return true
  })
  return router
}
