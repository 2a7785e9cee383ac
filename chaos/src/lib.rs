//! capkv fault injection.
//!
//! - [`FaultPlan`], [`FaultRule`], [`FaultAction`]: what to inject, with a one-line text
//!   form (`seed=7; get fail=unavailable p=0.3; * latency=300ms for=1m`) shared by the
//!   config file, the environment, the Admin capability and `kv-client admin faults`.
//! - [`Chaos`]: the armed plan, shared by every server worker. The server asks it once per
//!   call, in one place of its call chain, for a [`Decision`]. With nothing armed that is
//!   one atomic load.
//!
//! Seeded: a plan carries its RNG seed, so the same sequence of calls meets the same
//! faults. A rule may carry a lifetime (`for=30s`): a forgotten fault ends by itself; and
//! a count (`times=1`): it fires on that many calls, then ends ("fail the next get").
//! This crate knows method and error-code names only as strings; the server checks them
//! when a plan is armed.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Most rules in one plan: a plan is a test tool, not a rule engine.
pub const MAX_RULES: usize = 64;
/// Longest injected latency; a stall is the way to wait for the deadline.
pub const MAX_LATENCY: Duration = Duration::from_secs(60);

/// What a rule does to a call it fires on.
#[derive(Debug, Clone, PartialEq)]
pub enum FaultAction {
    /// Answer with this error code (by name, e.g. `unavailable`) without doing the work.
    Fail { code: String },
    /// Wait `fixed` ± up to `jitter` before the work (inside the call's deadline).
    Latency { fixed: Duration, jitter: Duration },
    /// Never answer: the call ends when its deadline does.
    Stall,
    /// Do the work (a write commits), then close the connection instead of replying: the
    /// client sees a write with unknown outcome.
    DropReply,
    /// Close the connection before doing the work.
    Close,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FaultRule {
    /// A method name (`get`, `put`, ...) or `*` for every data method.
    pub method: String,
    pub action: FaultAction,
    /// Chance that the rule fires on a matching call, in 0..=1.
    pub probability: f64,
    /// How long the rule stays armed after the plan is; `None` = until cleared.
    pub ttl: Option<Duration>,
    /// How many times the rule fires before it ends; `None` = no limit.
    pub times: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct FaultPlan {
    pub seed: u64,
    pub rules: Vec<FaultRule>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("fault rule `{rule}`: {why}")]
    Rule { rule: String, why: String },
    #[error("a fault plan holds at most {MAX_RULES} rules")]
    TooManyRules,
}

fn rule_error(rule: &str, why: impl Into<String>) -> PlanError {
    PlanError::Rule {
        rule: rule.to_string(),
        why: why.into(),
    }
}

/// A rule's lifetime (`for=`) at most: a plan is a test's or an incident's, not a config.
pub const MAX_RULE_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// One duration of a rule, at most `max`: a number and its unit (`250ms`, `30s`, `2h`),
/// as [`FaultRule`]'s text form writes them. One component only: humantime adds components
/// with a carry that can overflow (and panic) near `u64::MAX` seconds; a single one is
/// checked throughout.
fn parse_duration(rule: &str, s: &str, max: Duration) -> Result<Duration, PlanError> {
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let unit = &s[digits..];
    if digits == 0 || unit.is_empty() || !unit.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(rule_error(
            rule,
            format!("bad duration `{s}`: a number and its unit, e.g. 250ms"),
        ));
    }
    let d = humantime::parse_duration(s)
        .map_err(|e| rule_error(rule, format!("bad duration `{s}`: {e}")))?;
    if d > max {
        return Err(rule_error(
            rule,
            format!("duration `{s}` above {}", humantime::format_duration(max)),
        ));
    }
    Ok(d)
}

/// `d` as one number and its unit, the coarsest that is exact (what [`parse_duration`]
/// reads back).
fn one_unit(d: Duration) -> String {
    let nanos = d.as_nanos();
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else if nanos % 1_000_000 == 0 {
        format!("{}ms", d.as_millis())
    } else if nanos % 1_000 == 0 {
        format!("{}us", d.as_micros())
    } else {
        format!("{nanos}ns")
    }
}

impl FromStr for FaultRule {
    type Err = PlanError;

    /// `METHOD ACTION [p=P] [for=DURATION] [times=N]`, ACTION one of `fail=CODE`,
    /// `latency=D[+-J]`, `stall`, `drop-reply`, `close`.
    fn from_str(text: &str) -> Result<Self, PlanError> {
        let mut words = text.split_whitespace();
        let method = words
            .next()
            .ok_or_else(|| rule_error(text, "empty rule"))?
            .to_string();
        let action_word = words
            .next()
            .ok_or_else(|| rule_error(text, "missing action"))?;
        let action = match action_word.split_once('=') {
            Some(("fail", code)) if !code.is_empty() => FaultAction::Fail {
                code: code.to_string(),
            },
            Some(("latency", d)) => {
                let (fixed, jitter) = match d.split_once("+-") {
                    Some((f, j)) => (
                        parse_duration(text, f, MAX_LATENCY)?,
                        parse_duration(text, j, MAX_LATENCY)?,
                    ),
                    None => (parse_duration(text, d, MAX_LATENCY)?, Duration::ZERO),
                };
                // Each is at most MAX_LATENCY: the sum cannot overflow.
                if fixed + jitter > MAX_LATENCY {
                    return Err(rule_error(text, "latency above 60s; use `stall`"));
                }
                FaultAction::Latency { fixed, jitter }
            }
            None if action_word == "stall" => FaultAction::Stall,
            None if action_word == "drop-reply" => FaultAction::DropReply,
            None if action_word == "close" => FaultAction::Close,
            _ => {
                return Err(rule_error(
                    text,
                    format!("unknown action `{action_word}` (fail=CODE, latency=D[+-J], stall, drop-reply, close)"),
                ))
            }
        };
        let mut rule = FaultRule {
            method,
            action,
            probability: 1.0,
            ttl: None,
            times: None,
        };
        for word in words {
            match word.split_once('=') {
                Some(("p", p)) => {
                    rule.probability = p
                        .parse::<f64>()
                        .ok()
                        .filter(|p| (0.0..=1.0).contains(p))
                        .ok_or_else(|| rule_error(text, format!("p must be in 0..1, got `{p}`")))?;
                }
                Some(("for", d)) => rule.ttl = Some(parse_duration(text, d, MAX_RULE_TTL)?),
                Some(("times", n)) => {
                    rule.times =
                        Some(n.parse::<u64>().ok().filter(|n| *n > 0).ok_or_else(|| {
                            rule_error(text, format!("times must be a positive count, got `{n}`"))
                        })?);
                }
                _ => {
                    return Err(rule_error(
                        text,
                        format!("unknown option `{word}` (p=, for=, times=)"),
                    ))
                }
            }
        }
        Ok(rule)
    }
}

impl fmt::Display for FaultRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = one_unit;
        write!(f, "{} ", self.method)?;
        match &self.action {
            FaultAction::Fail { code } => write!(f, "fail={code}")?,
            FaultAction::Latency { fixed, jitter } if jitter.is_zero() => {
                write!(f, "latency={}", d(*fixed))?
            }
            FaultAction::Latency { fixed, jitter } => {
                write!(f, "latency={}+-{}", d(*fixed), d(*jitter))?
            }
            FaultAction::Stall => f.write_str("stall")?,
            FaultAction::DropReply => f.write_str("drop-reply")?,
            FaultAction::Close => f.write_str("close")?,
        }
        if self.probability < 1.0 {
            write!(f, " p={}", self.probability)?;
        }
        if let Some(ttl) = self.ttl {
            write!(f, " for={}", d(ttl))?;
        }
        if let Some(n) = self.times {
            write!(f, " times={n}")?;
        }
        Ok(())
    }
}

impl FromStr for FaultPlan {
    type Err = PlanError;

    /// Rules separated by `;`, optionally with a `seed=N` item; blank items are ignored.
    fn from_str(text: &str) -> Result<Self, PlanError> {
        let mut plan = FaultPlan::default();
        for item in text.split(';').map(str::trim).filter(|i| !i.is_empty()) {
            if let Some(seed) = item.strip_prefix("seed=") {
                plan.seed = seed
                    .trim()
                    .parse()
                    .map_err(|_| rule_error(item, "seed must be an unsigned integer"))?;
            } else {
                if plan.rules.len() == MAX_RULES {
                    return Err(PlanError::TooManyRules);
                }
                plan.rules.push(item.parse()?);
            }
        }
        Ok(plan)
    }
}

impl fmt::Display for FaultPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "seed={}", self.seed)?;
        for r in &self.rules {
            write!(f, "; {r}")?;
        }
        Ok(())
    }
}

/// What to do to one call. Several rules may fire on it; their effects add up.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Decision {
    pub delay: Duration,
    pub stall: bool,
    /// The error code name to fail with.
    pub fail: Option<String>,
    pub drop_reply: bool,
    pub close: bool,
}

struct Armed {
    plan: FaultPlan,
    /// Each rule's end, in rule order.
    ends: Vec<Option<Instant>>,
    /// Drawn and counted under one lock, so the same call sequence meets the same faults.
    state: Mutex<DrawState>,
}

struct DrawState {
    /// One generator for the plan: the same call sequence draws the same numbers.
    rng: StdRng,
    /// Each rule's firings left (`times=`), in rule order; `None` = no limit.
    left: Vec<Option<u64>>,
}

/// The armed fault plan of a server.
#[derive(Default)]
pub struct Chaos {
    armed: ArcSwapOption<Armed>,
    /// Whether `armed` holds a plan: what every call asks first, so it is one plain atomic
    /// load instead of an `ArcSwapOption` guard. Changed with `armed` under `changing`, so
    /// that it always says what `armed` holds once an `arm`, `clear` or disarm returns.
    is_armed: AtomicBool,
    changing: Mutex<()>,
}

impl fmt::Debug for Chaos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Chaos")
            .field("armed", &self.show())
            .finish()
    }
}

impl Chaos {
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the armed plan (an empty plan clears it). Rule lifetimes start now.
    pub fn arm(&self, plan: FaultPlan) {
        if plan.rules.is_empty() {
            self.clear();
            return;
        }
        let now = Instant::now();
        // A lifetime past what an `Instant` holds (only a plan built in code can have one)
        // never ends.
        let ends = plan
            .rules
            .iter()
            .map(|r| r.ttl.and_then(|t| now.checked_add(t)))
            .collect();
        let state = Mutex::new(DrawState {
            rng: StdRng::seed_from_u64(plan.seed),
            left: plan.rules.iter().map(|r| r.times).collect(),
        });
        let _changing = self.changing.lock().unwrap_or_else(|p| p.into_inner());
        self.armed
            .store(Some(Arc::new(Armed { plan, ends, state })));
        self.is_armed.store(true, Ordering::Release);
    }

    pub fn clear(&self) {
        let _changing = self.changing.lock().unwrap_or_else(|p| p.into_inner());
        self.armed.store(None);
        self.is_armed.store(false, Ordering::Release);
    }

    /// The rules still armed, each `ttl` being the time it has left.
    pub fn show(&self) -> FaultPlan {
        let Some(armed) = self.armed.load_full() else {
            return FaultPlan::default();
        };
        let now = Instant::now();
        let left = armed
            .state
            .lock()
            .map_or_else(|p| p.into_inner().left.clone(), |s| s.left.clone());
        let rules = armed
            .plan
            .rules
            .iter()
            .zip(&armed.ends)
            .zip(left)
            .filter_map(|((r, end), left)| match (end, left) {
                (_, Some(0)) => None,
                (None, _) => Some(FaultRule {
                    times: left,
                    ..r.clone()
                }),
                (Some(end), _) if *end > now => Some(FaultRule {
                    ttl: Some(*end - now),
                    times: left,
                    ..r.clone()
                }),
                (Some(_), _) => None,
            })
            .collect();
        FaultPlan {
            seed: armed.plan.seed,
            rules,
        }
    }

    /// The faults for one call of `method`; `None` when nothing fires.
    /// Whether a plan is armed (its rules may all have ended; `decide` says).
    pub fn is_armed(&self) -> bool {
        self.is_armed.load(Ordering::Acquire)
    }

    pub fn decide(&self, method: &str) -> Option<Decision> {
        let guard = self.armed.load();
        let armed = guard.as_ref()?;
        let now = Instant::now();
        let mut decision = None::<Decision>;
        // A poisoned lock only means another call panicked mid-draw; the RNG is still valid.
        let mut state = armed.state.lock().unwrap_or_else(|p| p.into_inner());
        let DrawState { rng, left } = &mut *state;
        let mut live = false;
        for ((rule, end), left) in armed.plan.rules.iter().zip(&armed.ends).zip(left) {
            if end.is_some_and(|end| end <= now) || *left == Some(0) {
                continue;
            }
            live = true;
            if rule.method != "*" && rule.method != method {
                continue;
            }
            if rule.probability < 1.0 && rng.random::<f64>() >= rule.probability {
                continue;
            }
            if let Some(n) = left {
                *n -= 1;
            }
            let d = decision.get_or_insert_with(Decision::default);
            match &rule.action {
                FaultAction::Fail { code } => {
                    d.fail.get_or_insert_with(|| code.clone());
                }
                FaultAction::Latency { fixed, jitter } => {
                    let j = if jitter.is_zero() {
                        Duration::ZERO
                    } else {
                        jitter.mul_f64(rng.random::<f64>())
                    };
                    d.delay += *fixed + j;
                }
                FaultAction::Stall => d.stall = true,
                FaultAction::DropReply => d.drop_reply = true,
                FaultAction::Close => d.close = true,
            }
        }
        drop(state);
        if !live {
            // Every rule has ended: disarm (unless a new plan came meanwhile), so later
            // calls pay one atomic load again.
            let _changing = self.changing.lock().unwrap_or_else(|p| p.into_inner());
            self.armed.compare_and_swap(&*guard, None::<Arc<Armed>>);
            self.is_armed
                .store(self.armed.load().is_some(), Ordering::Release);
        }
        decision
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_form_round_trips() {
        let text = "seed=7; get fail=unavailable p=0.3; * latency=300ms+-50ms for=1m; put drop-reply; scan stall; * close p=0.01";
        let plan: FaultPlan = text.parse().unwrap();
        assert_eq!(plan.seed, 7);
        assert_eq!(plan.rules.len(), 5);
        assert_eq!(
            plan.rules[1].action,
            FaultAction::Latency {
                fixed: Duration::from_millis(300),
                jitter: Duration::from_millis(50)
            }
        );
        assert_eq!(plan.rules[1].ttl, Some(Duration::from_secs(60)));
        assert_eq!(plan.to_string().parse::<FaultPlan>().unwrap(), plan);
    }

    #[test]
    fn bad_rules_say_what_is_wrong() {
        for (text, needle) in [
            ("get", "missing action"),
            ("get explode", "unknown action"),
            ("get fail=unavailable p=2", "p must be"),
            ("get stall for=soon", "bad duration"),
            ("get stall x=1", "unknown option"),
            ("get latency=2m", "above 1m"),
            ("get latency=1s+-18446744073709551615s", "above 1m"),
            ("get stall for=18446744073709551615s", "above 30days"),
            ("get stall for=300000000000y", "above 30days"),
            ("get stall for=99999999999999999999y", "bad duration"),
            (
                "get stall for=18446744073709551615s1000000000ns",
                "a number and its unit",
            ),
            ("get stall for=1h 30m", "unknown option"),
            ("seed=-1", "seed"),
        ] {
            let e = text.parse::<FaultPlan>().unwrap_err().to_string();
            assert!(e.contains(needle), "{text}: {e}");
        }
        let many = vec!["get stall"; MAX_RULES + 1].join(";");
        assert_eq!(many.parse::<FaultPlan>(), Err(PlanError::TooManyRules));
    }

    #[test]
    fn decisions_follow_method_probability_and_seed() {
        let chaos = Chaos::new();
        assert_eq!(chaos.decide("get"), None, "nothing armed");
        chaos.arm("seed=1; get fail=unavailable p=0.3".parse().unwrap());
        assert_eq!(chaos.decide("put"), None, "other methods untouched");
        let draw =
            |c: &Chaos| -> Vec<bool> { (0..1000).map(|_| c.decide("get").is_some()).collect() };
        let first = draw(&chaos);
        let fired = first.iter().filter(|f| **f).count();
        assert!((200..400).contains(&fired), "p=0.3 fired {fired}/1000");
        chaos.arm("seed=1; get fail=unavailable p=0.3".parse().unwrap());
        assert_eq!(draw(&chaos), first, "same seed, same faults");
    }

    #[test]
    fn effects_of_several_rules_add_up() {
        let chaos = Chaos::new();
        chaos.arm(
            "* latency=10ms; get latency=5ms; get fail=overloaded; get drop-reply"
                .parse()
                .unwrap(),
        );
        let d = chaos.decide("get").unwrap();
        assert_eq!(d.delay, Duration::from_millis(15));
        assert_eq!(d.fail.as_deref(), Some("overloaded"));
        assert!(d.drop_reply && !d.close && !d.stall);
        assert_eq!(
            chaos.decide("put").unwrap().delay,
            Duration::from_millis(10)
        );
    }

    #[test]
    fn rules_with_a_lifetime_end_by_themselves() {
        let chaos = Chaos::new();
        chaos.arm("get stall for=0s; put stall".parse().unwrap());
        assert_eq!(chaos.decide("get"), None, "a 0s rule has already ended");
        assert_eq!(chaos.show().rules.len(), 1);
        assert!(chaos.decide("put").unwrap().stall);

        chaos.arm("get stall for=0s".parse().unwrap());
        assert_eq!(chaos.decide("get"), None);
        assert!(
            chaos.armed.load().is_none(),
            "a plan whose rules all ended disarms"
        );
        chaos.arm("get stall for=1h".parse().unwrap());
        let ttl = chaos.show().rules[0].ttl.unwrap();
        assert!(ttl <= Duration::from_secs(3600) && ttl > Duration::from_secs(3500));
        chaos.clear();
        assert_eq!(chaos.show(), FaultPlan::default());
    }

    #[test]
    fn rules_with_a_count_fire_that_many_times() {
        let chaos = Chaos::new();
        let plan: FaultPlan = "get fail=unavailable times=2; put stall".parse().unwrap();
        assert_eq!(plan.to_string().parse::<FaultPlan>().unwrap(), plan);
        chaos.arm(plan);
        assert_eq!(chaos.show().rules[0].times, Some(2));
        assert!(chaos.decide("get").is_some());
        assert_eq!(chaos.show().rules[0].times, Some(1));
        assert!(
            chaos.decide("put").is_some(),
            "other methods do not use it up"
        );
        assert!(chaos.decide("get").is_some());
        assert_eq!(chaos.decide("get"), None, "used up");
        assert_eq!(chaos.show().rules.len(), 1);
        chaos.arm("get stall times=1".parse().unwrap());
        assert!(chaos.decide("get").is_some());
        assert_eq!(chaos.decide("get"), None);
        assert!(chaos.armed.load().is_none(), "a used-up plan disarms");
        for bad in [
            "get stall times=0",
            "get stall times=x",
            "get stall times=-1",
        ] {
            assert!(bad.parse::<FaultRule>().is_err(), "{bad}");
        }
    }
}
