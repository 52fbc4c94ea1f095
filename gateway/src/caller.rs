//! Who a request acts for. Every route that reads or writes tenant-owned rows asks
//! [`caller_scope`], so authentication changes this one place.
//!
//! Until accounts and API keys exist (issue 6), every request acts as the node's built-in
//! local user (`user_local`, an admin, created on first use), which is what a single
//! operator running `maas up` is.

use maas_store::TenantScope;

use crate::error::ApiError;
use crate::state::AppState;

/// The tenant scope of the request's caller.
pub async fn caller_scope(state: &AppState) -> Result<TenantScope, ApiError> {
    let stores = state.stores.get().ok_or_else(|| ApiError::unavailable("the store is starting; retry shortly"))?;
    let scope = state
        .local_scope
        .get_or_try_init(|| async {
            let user_id = stores.db.users().ensure_local().await?;
            TenantScope::resolve(&stores.db, &user_id, None).await
        })
        .await?;
    Ok(scope.clone())
}
