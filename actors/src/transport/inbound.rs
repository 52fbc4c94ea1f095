//! The raft endpoint of a node: the actor peers send raft messages to.

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};

use super::shared::Shared;
use super::wire::RaftWire;

/// Registered as `maas.raft.<id>` ([`super::raft_actor_name`]), so peers find it among
/// the actors their session with this node advertises.
pub(crate) struct RaftPeerActor {
    pub shared: Arc<Shared>,
}

impl Actor for RaftPeerActor {
    type Msg = RaftWire;
    type State = ();
    type Arguments = ();

    async fn pre_start(&self, _myself: ActorRef<RaftWire>, (): ()) -> Result<(), ActorProcessingErr> {
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<RaftWire>,
        message: RaftWire,
        (): &mut (),
    ) -> Result<(), ActorProcessingErr> {
        match message {
            RaftWire::Batch(batch) => {
                self.shared.deliver(&batch);
            }
            RaftWire::Snapshot(batch, reply) => {
                let delivered = self.shared.deliver(&batch) > 0;
                let _ = reply.send(delivered);
            }
        }
        Ok(())
    }
}
