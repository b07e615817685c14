//! Linearizable compare-and-set on one register, by single-decree Paxos
//! rounds over the partition's replicas (CASPaxos; spec/metadata.md,
//! "Compare-and-set"). The acceptor's rules and the proposer's counting
//! are here; the node carries the messages and keeps acceptor state durable
//! before it answers.

use std::collections::{BTreeMap, BTreeSet};

use crate::codec::{DecodeError, Reader, Writer};
use crate::ids::NodeId;
use crate::meta::QuorumSets;
use crate::metarpc::{AcceptedValue, Ballot, MAX_REGISTER_BYTES, Response};

const FORMAT_VERSION: u8 = 1;

/// What an acceptor keeps for one register.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AcceptorState {
    pub promised: Option<Ballot>,
    pub accepted: Option<AcceptedValue>,
}

impl AcceptorState {
    /// Phase 1: promise never to accept below `ballot`, if nothing higher
    /// was promised. Returns the answer and whether the state changed.
    pub fn on_prepare(&mut self, ballot: Ballot) -> Response {
        match self.promised {
            Some(promised) if promised >= ballot => Response::Conflict { promised },
            _ => {
                self.promised = Some(ballot);
                Response::Promise {
                    accepted: self.accepted.clone(),
                }
            }
        }
    }

    /// Phase 2: accept unless a higher ballot was promised.
    pub fn on_accept(&mut self, ballot: Ballot, value: Option<Vec<u8>>) -> Response {
        match self.promised {
            Some(promised) if promised > ballot => Response::Conflict { promised },
            _ => {
                self.promised = Some(ballot);
                self.accepted = Some(AcceptedValue { ballot, value });
                Response::Accepted
            }
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![FORMAT_VERSION];
        let promised = self.promised.unwrap_or(Ballot::ZERO);
        out.put_u64(promised.round);
        out.extend_from_slice(promised.node.as_bytes());
        match &self.accepted {
            None => out.put_u8(0),
            Some(accepted) => {
                out.put_u8(1);
                out.put_u64(accepted.ballot.round);
                out.extend_from_slice(accepted.ballot.node.as_bytes());
                match &accepted.value {
                    None => out.put_u8(0),
                    Some(value) => {
                        out.put_u8(1);
                        out.put_bytes32(value);
                    }
                }
            }
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let format = r.u8("acceptor format")?;
        if format != FORMAT_VERSION {
            return Err(DecodeError::InvalidValue {
                field: "acceptor format",
                value: u64::from(format),
            });
        }
        let ballot = |r: &mut Reader<'_>| -> Result<Ballot, DecodeError> {
            Ok(Ballot {
                round: r.u64("ballot round")?,
                node: NodeId(r.array("ballot node")?),
            })
        };
        let promised = Some(ballot(&mut r)?).filter(|b| *b != Ballot::ZERO);
        let accepted = match r.bool("accepted present")? {
            false => None,
            true => Some(AcceptedValue {
                ballot: ballot(&mut r)?,
                value: match r.bool("value present")? {
                    false => None,
                    true => Some(r.bytes32("register value", MAX_REGISTER_BYTES)?.to_vec()),
                },
            }),
        };
        r.finish("acceptor state")?;
        Ok(Self { promised, accepted })
    }
}

/// What a register holds: the value, tagged with the id of the operation
/// that wrote it, so that a proposer whose accept landed but whose answer
/// was lost recognises its own write on the next attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaggedValue {
    pub operation: [u8; 16],
    pub value: Option<Vec<u8>>,
}

impl TaggedValue {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.operation.to_vec();
        match &self.value {
            None => out.put_u8(0),
            Some(value) => {
                out.put_u8(1);
                out.put_bytes32(value);
            }
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let operation = r.array("operation id")?;
        let value = match r.bool("value present")? {
            false => None,
            true => Some(r.bytes32("register value", MAX_REGISTER_BYTES)?.to_vec()),
        };
        r.finish("register value")?;
        Ok(Self { operation, value })
    }
}

/// Where a proposer's phase stands after the answers so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tally {
    /// Not enough answers yet either way.
    Pending,
    /// A majority granted.
    Won,
    /// A majority can no longer grant; retry with a ballot above `seen`.
    Lost { seen: Option<Ballot> },
}

/// Counts one phase's answers from the acceptors of some quorum sets.
#[derive(Debug, Clone)]
pub struct PhaseTally {
    sets: QuorumSets,
    granted: BTreeSet<NodeId>,
    refused: BTreeSet<NodeId>,
    highest_conflict: Option<Ballot>,
    /// Phase 1: the value accepted under the highest ballot among promises.
    latest: Option<AcceptedValue>,
}

impl PhaseTally {
    pub fn new(sets: QuorumSets) -> Self {
        Self {
            sets,
            granted: BTreeSet::new(),
            refused: BTreeSet::new(),
            highest_conflict: None,
            latest: None,
        }
    }

    /// Records `node`'s answer; `None` for no answer (a failure).
    pub fn record(&mut self, node: NodeId, answer: Option<&Response>) -> Tally {
        match answer {
            Some(Response::Promise { accepted }) => {
                self.granted.insert(node);
                if let Some(accepted) = accepted
                    && self
                        .latest
                        .as_ref()
                        .is_none_or(|l| accepted.ballot > l.ballot)
                {
                    self.latest = Some(accepted.clone());
                }
            }
            Some(Response::Accepted) => {
                self.granted.insert(node);
            }
            Some(Response::Conflict { promised }) => {
                self.refused.insert(node);
                self.highest_conflict = self.highest_conflict.max(Some(*promised));
            }
            _ => {
                self.refused.insert(node);
            }
        }
        self.tally()
    }

    pub fn tally(&self) -> Tally {
        if self.sets.reached(&self.granted) {
            Tally::Won
        } else if self.sets.lost(&self.refused) {
            Tally::Lost {
                seen: self.highest_conflict,
            }
        } else {
            Tally::Pending
        }
    }

    /// After a won phase 1: the register's current value (the one accepted
    /// under the highest ballot; `None` if none or the register is empty).
    pub fn current_value(&self) -> Option<&[u8]> {
        self.latest.as_ref().and_then(|l| l.value.as_deref())
    }
}

/// Where a one-round register read stands (spec/metadata.md, "Reading a
/// register"): each replica reports what it last accepted, without
/// promising anything. When a majority of every quorum set reports the
/// same ballot, that ballot's value was chosen, and no later value had been
/// chosen when the read began (a later one would have been accepted by a
/// majority, which meets this one), so returning it is linearizable.
/// Replicas that disagree (a write in flight, or one that a replica
/// missed) leave the read undecided: the caller then runs a full round.
#[derive(Debug, Clone)]
pub struct ReadTally {
    sets: QuorumSets,
    /// Replicas by what they last accepted: the ballot and its value
    /// (`None`: nothing yet). Keyed by both, so that a replica claiming
    /// another value under the same ballot does not count as agreeing.
    by_accepted: BTreeMap<Accepted, BTreeSet<NodeId>>,
    answered: BTreeSet<NodeId>,
}

/// What one replica's acceptor last accepted, as it answered.
type Accepted = Option<(Ballot, Option<Vec<u8>>)>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadOutcome {
    /// The register's chosen value: the raw accepted bytes (a
    /// [`TaggedValue`]), `None` when nothing was ever chosen.
    Chosen(Option<Vec<u8>>),
    Pending,
    /// No ballot can reach a majority of every set any more.
    Undecided,
}

impl ReadTally {
    pub fn new(sets: QuorumSets) -> Self {
        Self {
            sets,
            by_accepted: BTreeMap::new(),
            answered: BTreeSet::new(),
        }
    }

    /// Records `node`'s answer; `None` (or any other answer) for a failure.
    pub fn record(&mut self, node: NodeId, answer: Option<&Response>) -> ReadOutcome {
        if !self.answered.insert(node) {
            return self.outcome();
        }
        if let Some(Response::RegisterState { accepted }) = answer {
            let accepted = accepted
                .as_ref()
                .map(|accepted| (accepted.ballot, accepted.value.clone()));
            self.by_accepted.entry(accepted).or_default().insert(node);
        }
        self.outcome()
    }

    pub fn outcome(&self) -> ReadOutcome {
        if let Some((accepted, _)) = self
            .by_accepted
            .iter()
            .find(|(_, nodes)| self.sets.reached(nodes))
        {
            return ReadOutcome::Chosen(accepted.as_ref().and_then(|(_, value)| value.clone()));
        }
        // Once a majority has answered without agreeing, waiting for the
        // rest (perhaps down until a timeout) buys nothing a full round
        // does not: the caller runs one.
        let answered: BTreeSet<NodeId> = self
            .by_accepted
            .values()
            .flat_map(|nodes| nodes.iter().copied())
            .collect();
        if self.sets.reached(&answered) {
            return ReadOutcome::Undecided;
        }
        let unanswered: BTreeSet<NodeId> = self
            .sets
            .nodes()
            .into_iter()
            .filter(|n| !self.answered.contains(n))
            .collect();
        let empty = BTreeSet::new();
        let can_still_agree = self
            .by_accepted
            .values()
            .chain(std::iter::once(&empty))
            .any(|nodes| {
                let possible: BTreeSet<NodeId> = nodes.union(&unanswered).copied().collect();
                self.sets.reached(&possible)
            });
        if can_still_agree {
            ReadOutcome::Pending
        } else {
            ReadOutcome::Undecided
        }
    }
}

/// The next ballot for `node` above everything seen.
pub fn next_ballot(node: NodeId, last_round: u64, seen: Option<Ballot>) -> Ballot {
    let round = last_round.max(seen.map_or(0, |b| b.round)) + 1;
    Ballot { round, node }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three() -> QuorumSets {
        QuorumSets::new((1..=3).map(|i| NodeId([i; 32])).collect(), None)
    }

    fn ballot(round: u64, node: u8) -> Ballot {
        Ballot {
            round,
            node: NodeId([node; 32]),
        }
    }

    #[test]
    fn an_acceptor_keeps_its_promises() {
        let mut acceptor = AcceptorState::default();
        assert_eq!(
            acceptor.on_prepare(ballot(2, 1)),
            Response::Promise { accepted: None }
        );
        assert_eq!(
            acceptor.on_prepare(ballot(1, 9)),
            Response::Conflict {
                promised: ballot(2, 1)
            }
        );
        assert_eq!(
            acceptor.on_accept(ballot(1, 9), Some(b"x".to_vec())),
            Response::Conflict {
                promised: ballot(2, 1)
            }
        );
        assert_eq!(
            acceptor.on_accept(ballot(2, 1), Some(b"y".to_vec())),
            Response::Accepted
        );
        assert_eq!(
            acceptor.on_prepare(ballot(3, 0)),
            Response::Promise {
                accepted: Some(AcceptedValue {
                    ballot: ballot(2, 1),
                    value: Some(b"y".to_vec())
                })
            }
        );
        let bytes = acceptor.encode();
        assert_eq!(AcceptorState::decode(&bytes).unwrap(), acceptor);
        for len in 0..bytes.len() {
            assert!(AcceptorState::decode(&bytes[..len]).is_err());
        }
    }

    #[test]
    fn a_phase_is_won_by_a_majority_and_adopts_the_latest_accepted_value() {
        let mut tally = PhaseTally::new(three());
        let older = Response::Promise {
            accepted: Some(AcceptedValue {
                ballot: ballot(1, 1),
                value: Some(b"old".to_vec()),
            }),
        };
        let newer = Response::Promise {
            accepted: Some(AcceptedValue {
                ballot: ballot(2, 1),
                value: Some(b"new".to_vec()),
            }),
        };
        assert_eq!(tally.record(NodeId([1; 32]), Some(&newer)), Tally::Pending);
        assert_eq!(tally.record(NodeId([2; 32]), Some(&older)), Tally::Won);
        assert_eq!(tally.current_value(), Some(&b"new"[..]));
    }

    #[test]
    fn tagged_values_round_trip_and_truncations_fail() {
        for value in [None, Some(b"head".to_vec())] {
            let tagged = TaggedValue {
                operation: [7; 16],
                value,
            };
            let bytes = tagged.encode();
            assert_eq!(TaggedValue::decode(&bytes).unwrap(), tagged);
            for len in 0..bytes.len() {
                assert!(TaggedValue::decode(&bytes[..len]).is_err());
            }
        }
    }

    fn state(round: u64, value: &[u8]) -> Response {
        Response::RegisterState {
            accepted: Some(AcceptedValue {
                ballot: ballot(round, 1),
                value: Some(value.to_vec()),
            }),
        }
    }

    #[test]
    fn a_read_is_decided_by_a_majority_that_accepted_the_same_ballot() {
        let mut tally = ReadTally::new(three());
        assert_eq!(tally.record(NodeId([1; 32]), None), ReadOutcome::Pending);
        assert_eq!(
            tally.record(NodeId([2; 32]), Some(&state(5, b"w"))),
            ReadOutcome::Pending
        );
        assert_eq!(
            tally.record(NodeId([3; 32]), Some(&state(5, b"w"))),
            ReadOutcome::Chosen(Some(b"w".to_vec()))
        );
        let mut empty = ReadTally::new(three());
        let nothing = Response::RegisterState { accepted: None };
        empty.record(NodeId([1; 32]), Some(&nothing));
        assert_eq!(
            empty.record(NodeId([3; 32]), Some(&nothing)),
            ReadOutcome::Chosen(None)
        );
    }

    #[test]
    fn a_read_without_agreement_is_undecided() {
        // A majority that answered without agreeing decides it: the third
        // replica is not waited for.
        let mut tally = ReadTally::new(three());
        tally.record(NodeId([1; 32]), Some(&state(4, b"v")));
        assert_eq!(
            tally.record(NodeId([2; 32]), Some(&state(5, b"w"))),
            ReadOutcome::Undecided
        );
        // One ballot claimed with two values is no agreement.
        let mut tally = ReadTally::new(three());
        tally.record(NodeId([1; 32]), Some(&state(5, b"w")));
        assert_eq!(
            tally.record(NodeId([2; 32]), Some(&state(5, b"x"))),
            ReadOutcome::Undecided
        );
        // Failures alone leave it undecided once no majority can agree.
        let mut tally = ReadTally::new(three());
        tally.record(NodeId([1; 32]), None);
        assert_eq!(tally.record(NodeId([2; 32]), None), ReadOutcome::Undecided);
        // A repeated answer counts once.
        let mut tally = ReadTally::new(three());
        tally.record(NodeId([1; 32]), Some(&state(4, b"v")));
        assert_eq!(
            tally.record(NodeId([1; 32]), Some(&state(4, b"v"))),
            ReadOutcome::Pending
        );
    }

    #[test]
    fn a_phase_is_lost_once_a_majority_cannot_grant() {
        let mut tally = PhaseTally::new(three());
        assert_eq!(tally.record(NodeId([1; 32]), None), Tally::Pending);
        assert_eq!(
            tally.record(
                NodeId([2; 32]),
                Some(&Response::Conflict {
                    promised: ballot(7, 2)
                })
            ),
            Tally::Lost {
                seen: Some(ballot(7, 2))
            }
        );
        assert_eq!(next_ballot(NodeId([1; 32]), 3, Some(ballot(7, 2))).round, 8);
    }
}
