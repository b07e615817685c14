//! The one way the node calls a peer: attempts with a deadline each, and
//! a doubling pause between them, for the errors worth another attempt.

use std::future::Future;
use std::time::Duration;

/// How a call is tried.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Retries {
    /// Attempts at most, the first included.
    pub(crate) attempts: u32,
    /// The pause before the second attempt; each later one doubles it.
    pub(crate) first_pause: Duration,
    /// How long one attempt may take.
    pub(crate) deadline: Duration,
}

/// Runs `attempt` (given its number, from 0) until it succeeds, fails with
/// an error `transient` does not pass, or the attempts are used up; an
/// attempt past its deadline fails with `timed_out()`.
pub(crate) async fn call<T, E, F, Fut>(
    retries: Retries,
    mut attempt: F,
    transient: impl Fn(&E) -> bool,
    timed_out: impl Fn() -> E,
) -> Result<T, E>
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let mut pause = retries.first_pause;
    let mut number = 0;
    // One deadline for the whole call: a peer that fails each attempt just
    // before its end must not multiply the wait.
    let deadline = tokio::time::Instant::now() + retries.deadline;
    loop {
        let outcome = tokio::time::timeout_at(deadline, attempt(number))
            .await
            .unwrap_or_else(|_| Err(timed_out()));
        match outcome {
            Err(error) if number + 1 < retries.attempts && transient(&error) => {
                tracing::debug!(%error, attempt = number, "call failed; trying again");
            }
            done => return done,
        }
        number += 1;
        if tokio::time::Instant::now() + pause >= deadline {
            return Err(timed_out());
        }
        tokio::time::sleep(pause).await;
        pause = pause.saturating_mul(2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUICK: Retries = Retries {
        attempts: 3,
        first_pause: Duration::from_millis(1),
        deadline: Duration::from_secs(5),
    };

    #[tokio::test]
    async fn transient_errors_are_tried_again_up_to_the_attempts_and_others_not() {
        let mut tries = 0;
        let outcome: Result<(), String> = call(
            QUICK,
            |_| {
                tries += 1;
                async { Err("lost".to_owned()) }
            },
            |e| e == "lost",
            || "late".to_owned(),
        )
        .await;
        assert_eq!((outcome, tries), (Err("lost".to_owned()), 3));
        let mut tries = 0;
        let outcome: Result<(), String> = call(
            QUICK,
            |_| {
                tries += 1;
                async { Err("refused".to_owned()) }
            },
            |e| e == "lost",
            || "late".to_owned(),
        )
        .await;
        assert_eq!((outcome, tries), (Err("refused".to_owned()), 1));
        let outcome = call(
            QUICK,
            |n| async move { if n < 2 { Err("lost".to_owned()) } else { Ok(n) } },
            |e| e == "lost",
            || "late".to_owned(),
        )
        .await;
        assert_eq!(outcome, Ok(2));
    }

    #[tokio::test]
    async fn an_attempt_past_its_deadline_fails_as_timed_out() {
        let outcome: Result<(), String> = call(
            Retries {
                attempts: 1,
                deadline: Duration::from_millis(10),
                ..QUICK
            },
            |_| std::future::pending(),
            |_| true,
            || "late".to_owned(),
        )
        .await;
        assert_eq!(outcome, Err("late".to_owned()));
    }

    /// A peer that fails each attempt just before its end: the deadline
    /// holds for the whole call, not once per attempt.
    #[tokio::test]
    async fn the_deadline_covers_every_attempt_together() {
        let retries = Retries {
            attempts: 5,
            first_pause: Duration::from_millis(1),
            deadline: Duration::from_millis(200),
        };
        let mut tries = 0;
        let outcome: Result<(), String> = call(
            retries,
            |_| {
                tries += 1;
                async {
                    tokio::time::sleep(Duration::from_millis(150)).await;
                    Err("lost".to_owned())
                }
            },
            |e| e == "lost",
            || "late".to_owned(),
        )
        .await;
        assert_eq!(outcome, Err("late".to_owned()));
        assert!(tries <= 2, "{tries} attempts");
    }
}
