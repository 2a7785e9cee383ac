//! The skeleton of a `Call` read by hand: `Message` → `Call` → `Payload`, the few fixed
//! fields the frame layer's check and the engine's head need, without capnp's checked
//! reader.
//!
//! Why: every Call a server receives passes the frame layer's check, and capnp's reader pays
//! for each struct pointer it follows with several calls (bounds, far pointers, the read
//! limit) behind a trait object: the check's walk of a Call was about a fifteenth of the
//! server's CPU at 16 gets in flight. The skeleton sits at fixed places in `rpc.capnp`'s
//! layout, so it is read here in a few word loads.
//!
//! Exactness: [`read`] answers only for the plain shape every Cap'n Proto implementation
//! writes (one segment, near struct pointers within it, sections at least as large as the
//! fields read, a null or empty params cap table). Anything else — a far pointer, a short
//! section, a null pointer capnp would read as a default, a non-empty cap table — gives
//! `None` and the caller reads the message with capnp as before. So for every message it
//! accepts, it reads what capnp reads, and the checks built on it decide as capnp's would
//! (debug builds assert this for every frame the frame layer checks: `frames` tests and
//! the fuzz target run both).

/// What [`read`] found in a Call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Skeleton {
    pub(crate) question_id: u32,
    pub(crate) interface_id: u64,
    pub(crate) method_id: u16,
    /// `sendResultsTo` is `caller`.
    pub(crate) to_caller: bool,
    /// The import the Call targets (`importedCap`); `None` for `promisedAnswer`.
    pub(crate) imported: Option<u32>,
    /// Where `params.content`'s pointer is: its word index in the segment.
    pub(crate) content_at: usize,
}

/// `Message`'s union tag for `call` (`rpc.capnp`).
const MESSAGE_CALL: u16 = 2;

/// The skeleton of the Call in `segment` (a single-segment message's words, as bytes), or
/// `None` when it is not a Call or not of the plain shape (see the module docs).
pub(crate) fn read(segment: &[u8]) -> Option<Skeleton> {
    let words = Words(segment);
    // Message: data word 0 holds the union tag; pointer 0 the Call.
    let message = words.struct_at(0)?;
    if message.data < 1 || message.ptrs < 1 || words.get(message.start)? as u16 != MESSAGE_CALL {
        return None;
    }
    // Call: questionId (u32 @0), methodId (u16 @2), sendResultsTo's tag (u16 @3),
    // interfaceId (u64 @1): two data words; pointers target (0) and params (1).
    let call = words.struct_at(message.pointer(0))?;
    if call.data < 2 || call.ptrs < 2 {
        return None;
    }
    let head = words.get(call.start)?;
    let send_results_to = (head >> 48) as u16;
    // MessageTarget: importedCap (u32 @0), union tag (u16 @2).
    let target = words.struct_at(call.pointer(0))?;
    if target.data < 1 {
        return None;
    }
    let target_word = words.get(target.start)?;
    let imported = match (target_word >> 32) as u16 {
        0 => Some(target_word as u32),
        1 => None,
        _ => return None,
    };
    // Payload: content (pointer 0), capTable (pointer 1).
    let payload = words.struct_at(call.pointer(1))?;
    if payload.ptrs < 2 || !words.empty_struct_list(payload.pointer(1))? {
        return None;
    }
    Some(Skeleton {
        question_id: head as u32,
        interface_id: words.get(call.start + 1)?,
        method_id: (head >> 32) as u16,
        to_caller: send_results_to == 0,
        imported,
        content_at: payload.pointer(0),
    })
}

/// Levels between a reader's nesting limit and the deepest a plain subtree may go
/// ([`plain_subtree`]): the levels above a Call's params in the message (Message, Call,
/// Payload) and one to spare, so that neither read meets the limit.
const DEPTH_MARGIN: i32 = 5;
/// Pointers a plain subtree may hold: a call's params have a handful.
const MAX_POINTERS: usize = 256;

/// Whether everything capnp could read from the pointer at word `at` of `segment` lies in
/// the segment from `at` on, reached through near pointers only, [`DEPTH_MARGIN`] levels
/// short of `nesting_limit` (the readers' own) at most, with no more words read than the
/// segment holds (no amplification). Then a
/// view of the segment that starts at `at` (its word 0 that pointer) reads exactly what the
/// whole message reads there: every pointer resolves relative to itself, to the same bytes,
/// and no read limit is met in either. A far pointer (whose target is absolute), a target
/// before `at`, anything out of bounds or malformed: `false`, and the caller reads from
/// the message's root.
pub(crate) fn plain_subtree(segment: &[u8], at: usize, nesting_limit: i32) -> bool {
    let words = Words(segment);
    let mut budget = Budget {
        pointers: MAX_POINTERS,
        words: words.len(),
    };
    let depth = u32::try_from(nesting_limit.saturating_sub(DEPTH_MARGIN)).unwrap_or(0);
    words.plain(at, at, depth, &mut budget)
}

/// What a [`plain_subtree`] walk may still visit.
struct Budget {
    pointers: usize,
    words: usize,
}

impl Budget {
    /// Charges `n` words read; `false` past the budget.
    fn charge(&mut self, n: usize) -> bool {
        match self.words.checked_sub(n) {
            Some(left) => {
                self.words = left;
                true
            }
            None => false,
        }
    }
}

/// Where the near struct or list pointer `p` at word `at` points: its offset in words
/// from the end of the pointer is the upper 30 bits of its low half, signed. `None` before
/// the segment's start.
fn target(at: usize, p: u64) -> Option<usize> {
    let offset = i64::from((p as u32 as i32) >> 2);
    usize::try_from(i64::try_from(at).ok()? + 1 + offset).ok()
}

/// A struct's place: its first data word, and its section sizes in words.
#[derive(Debug, Clone, Copy)]
struct Place {
    start: usize,
    data: usize,
    ptrs: usize,
}

impl Place {
    /// The word index of pointer `i` (within the section: callers check `i < ptrs`).
    fn pointer(&self, i: usize) -> usize {
        self.start + self.data + i
    }
}

/// A segment's words, every read bounds-checked.
struct Words<'a>(&'a [u8]);

impl Words<'_> {
    fn len(&self) -> usize {
        self.0.len() / 8
    }

    fn get(&self, i: usize) -> Option<u64> {
        let b = self
            .0
            .get(i.checked_mul(8)?..i.checked_add(1)?.checked_mul(8)?)?;
        Some(u64::from_le_bytes(b.try_into().ok()?))
    }

    /// The struct a near struct pointer at word `at` points to, within the segment. `None`
    /// for a null pointer (capnp would read a default), any other kind, or out of bounds.
    fn struct_at(&self, at: usize) -> Option<Place> {
        let p = self.get(at)?;
        if p == 0 || p & 3 != 0 {
            return None;
        }
        let start = target(at, p)?;
        let data = usize::from((p >> 32) as u16);
        let ptrs = usize::from((p >> 48) as u16);
        let end = start.checked_add(data)?.checked_add(ptrs)?;
        (end <= self.len()).then_some(Place { start, data, ptrs })
    }

    /// The walk of [`plain_subtree`] from the pointer at `at`, whose targets must not start
    /// before word `floor`.
    fn plain(&self, at: usize, floor: usize, depth: u32, budget: &mut Budget) -> bool {
        let Some(p) = self.get(at) else {
            return false;
        };
        if p == 0 {
            return true;
        }
        if depth == 0 || budget.pointers == 0 {
            return false;
        }
        budget.pointers -= 1;
        let start = || target(at, p).filter(|&start| start >= floor);
        match p & 3 {
            // A struct: its pointers in turn.
            0 => {
                let Some(s) = self.struct_at(at).filter(|s| s.start >= floor) else {
                    return false;
                };
                budget.charge(s.data + s.ptrs)
                    && (0..s.ptrs).all(|i| self.plain(s.pointer(i), floor, depth - 1, budget))
            }
            // A list: its bounds, then the pointers it holds.
            1 => {
                let Some(start) = start() else {
                    return false;
                };
                let size = (p >> 32) & 7;
                let count = usize::try_from(p >> 35).unwrap_or(usize::MAX);
                match size {
                    // Void elements read no words; capnp charges them as reads.
                    0 => budget.charge(count),
                    // Bits, bytes, 16-, 32-, 64-bit elements: data only.
                    1..=5 => {
                        let bits = [0, 1, 8, 16, 32, 64][size as usize];
                        let words = count.saturating_mul(bits).div_ceil(64);
                        start.saturating_add(words) <= self.len() && budget.charge(words)
                    }
                    // Pointers.
                    6 => {
                        start.saturating_add(count) <= self.len()
                            && budget.charge(count)
                            && (0..count).all(|i| self.plain(start + i, floor, depth - 1, budget))
                    }
                    // Structs, after a tag that says how many and how large.
                    _ => {
                        let word_count = count;
                        let Some(tag) = self.get(start) else {
                            return false;
                        };
                        let elements = ((tag as u32) >> 2) as usize;
                        let data = usize::from((tag >> 32) as u16);
                        let ptrs = usize::from((tag >> 48) as u16);
                        let fits = tag & 3 == 0
                            && start.saturating_add(1).saturating_add(word_count) <= self.len()
                            && elements.saturating_mul(data + ptrs) <= word_count
                            && budget.charge(word_count.max(elements));
                        fits && (0..elements).all(|e| {
                            let first = start + 1 + e * (data + ptrs) + data;
                            (0..ptrs).all(|i| self.plain(first + i, floor, depth - 1, budget))
                        })
                    }
                }
            }
            // A capability (index only, no target); anything else of this kind is malformed.
            3 => (p as u32) >> 2 == 0,
            // A far pointer: its target is absolute, so a view would read elsewhere.
            _ => false,
        }
    }

    /// Whether the pointer at `at` is a null or empty struct list as capnp would read
    /// one: null, or a composite list of no words whose tag (in bounds) counts no
    /// element. `None` for anything else.
    fn empty_struct_list(&self, at: usize) -> Option<bool> {
        let p = self.get(at)?;
        if p == 0 {
            return Some(true);
        }
        // List pointer, composite element size (7), zero words.
        if p & 3 != 1 || (p >> 32) & 7 != 7 || p >> 35 != 0 {
            return None;
        }
        let tag = self.get(target(at, p)?)?;
        // The tag is a struct pointer whose offset field counts the elements.
        (tag & 3 == 0 && (tag as u32) >> 2 == 0).then_some(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capnp::message;
    use capnp_rpc::rpc_capnp::{call, message as rpc_message, message_target};

    /// What fills in a Call.
    type Shape = dyn Fn(call::Builder<'_>);

    /// A Call's words as one segment, built by capnp: `shape` fills it in.
    fn call_words(shape: impl FnOnce(call::Builder<'_>)) -> Vec<u8> {
        let mut m = message::Builder::new_default();
        shape(m.init_root::<rpc_message::Builder>().init_call());
        let segments = m.get_segments_for_output();
        assert_eq!(segments.len(), 1);
        segments[0].to_vec()
    }

    fn plain(mut c: call::Builder<'_>) {
        c.set_question_id(7);
        c.set_interface_id(0xdead_beef_0123_4567);
        c.set_method_id(3);
        c.reborrow().init_target().set_imported_cap(5);
        let mut p = c.init_params();
        p.reborrow()
            .get_content()
            .set_as::<capnp::text::Owned>("k")
            .unwrap();
        p.init_cap_table(0);
    }

    /// What capnp reads of the same fields: the reference.
    fn by_capnp(segment: &[u8]) -> Option<Skeleton> {
        let words = capnp::Word::allocate_zeroed_vec(segment.len() / 8);
        let mut words = words;
        capnp::Word::words_to_bytes_mut(&mut words).copy_from_slice(segment);
        let segs = [capnp::Word::words_to_bytes(&words)];
        let m = message::Reader::new(
            message::SegmentArray::new(&segs),
            message::ReaderOptions::new(),
        );
        let root = m.get_root::<rpc_message::Reader<'_>>().ok()?;
        let rpc_message::Call(c) = root.which().ok()? else {
            return None;
        };
        let c = c.ok()?;
        let params = c.get_params().ok()?;
        let caps = params.get_cap_table().ok()?.len();
        let imported = match c.get_target().ok()?.which().ok()? {
            message_target::ImportedCap(id) => Some(id),
            message_target::PromisedAnswer(_) => None,
        };
        (caps == 0).then_some(Skeleton {
            question_id: c.get_question_id(),
            interface_id: c.get_interface_id(),
            method_id: c.get_method_id(),
            to_caller: matches!(
                c.get_send_results_to().which(),
                Ok(call::send_results_to::Caller(()))
            ),
            imported,
            content_at: 0,
        })
    }

    fn without_place(s: Skeleton) -> Skeleton {
        Skeleton { content_at: 0, ..s }
    }

    #[test]
    fn reads_what_capnp_reads_of_plain_calls() {
        let shapes: Vec<Box<Shape>> = vec![
            Box::new(plain),
            Box::new(|mut c| {
                plain(c.reborrow());
                c.init_target().init_promised_answer().set_question_id(2);
            }),
            Box::new(|mut c| {
                plain(c.reborrow());
                c.get_send_results_to().set_yourself(());
            }),
            // A null cap table reads as an empty one.
            Box::new(|mut c| {
                c.set_question_id(1);
                c.reborrow().init_target().set_imported_cap(0);
                c.init_params();
            }),
        ];
        for shape in shapes {
            let words = call_words(shape);
            let s = read(&words).expect("a plain call");
            assert_eq!(Some(without_place(s)), by_capnp(&words));
        }
    }

    #[test]
    fn leaves_other_shapes_to_capnp() {
        // A capability in the params.
        let words = call_words(|mut c| {
            plain(c.reborrow());
            c.init_params()
                .init_cap_table(1)
                .get(0)
                .set_sender_hosted(1);
        });
        assert_eq!(read(&words), None);
        // No params pointer (capnp would read a default).
        let words = call_words(|mut c| {
            c.reborrow().init_target().set_imported_cap(1);
        });
        assert_eq!(read(&words), None);
        // Not a Call.
        let mut m = message::Builder::new_default();
        m.init_root::<rpc_message::Builder>()
            .init_finish()
            .set_question_id(1);
        assert_eq!(read(m.get_segments_for_output()[0]), None);
        // Nothing at all, and a torn word.
        assert_eq!(read(&[]), None);
        assert_eq!(read(&[0; 5]), None);
    }

    /// A get's call as capkv's clients send it: a context with texts, and a key.
    fn get_call(mut c: call::Builder<'_>) {
        use capkv::kv_capnp::kv_store;
        c.set_question_id(3);
        c.set_interface_id(7);
        c.reborrow().init_target().set_imported_cap(1);
        let mut p = c.init_params();
        p.reborrow().init_cap_table(0);
        let mut g = p
            .init_content()
            .init_as::<kv_store::get_params::Builder<'_>>();
        g.set_key(b"key:000000012345");
        let mut ctx = g.init_ctx();
        ctx.reborrow().init_deadline().set_budget_ms(250);
        ctx.set_request_id("req-7");
        ctx.set_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
        ctx.set_attempt(2);
    }

    /// What a get's params read as, errors included (as "err"), through `params`.
    fn get_params_read(params: capnp::Result<capnp::any_pointer::Reader<'_>>) -> String {
        use capkv::kv_capnp::{kv_store, request_context};
        let Ok(g) = params.and_then(|p| p.get_as::<kv_store::get_params::Reader<'_>>()) else {
            return "err".into();
        };
        let text = |t: capnp::Result<capnp::text::Reader<'_>>| match t {
            Ok(t) => format!("{:?}", t.as_bytes()),
            Err(_) => "err".into(),
        };
        let key = match g.get_key() {
            Ok(k) => format!("{k:?}"),
            Err(_) => "err".into(),
        };
        let ctx = match g.get_ctx() {
            Ok(c) => format!(
                "{:?} {} {} {} {}",
                match c.get_deadline().which() {
                    Ok(request_context::deadline::Unset(())) => Some(0),
                    Ok(request_context::deadline::BudgetMs(ms)) => Some(ms),
                    Err(_) => None,
                },
                text(c.get_traceparent()),
                text(c.get_tracestate()),
                text(c.get_request_id()),
                c.get_attempt()
            ),
            Err(_) => "err".into(),
        };
        format!("{key} | {ctx}")
    }

    /// The params of `segment`'s Call read from the root, and through a view from their
    /// pointer.
    fn both_reads(segment: &[u8], at: usize) -> (String, String) {
        let mut words = capnp::Word::allocate_zeroed_vec(segment.len() / 8);
        capnp::Word::words_to_bytes_mut(&mut words).copy_from_slice(segment);
        let bytes = capnp::Word::words_to_bytes(&words);
        let segs = [bytes];
        let mut options = message::ReaderOptions::new();
        options.nesting_limit(16);
        let whole = message::Reader::new(message::SegmentArray::new(&segs), options);
        let from_root = get_params_read(crate::frames::call_params(&whole));
        let view = crate::frames::content_view(bytes, at, options).expect("within the segment");
        (from_root, get_params_read(view.get_root()))
    }

    #[test]
    fn a_plain_subtree_reads_alike_through_a_view() {
        let words = call_words(get_call);
        let s = read(&words).expect("a plain call");
        assert!(plain_subtree(&words, s.content_at, 16));
        // Deeper than the readers' nesting limit allows with room to spare: not plain.
        assert!(!plain_subtree(&words, s.content_at, 7));
        let (from_root, through_view) = both_reads(&words, s.content_at);
        assert!(
            from_root.contains("250") && from_root.contains("2"),
            "{from_root}"
        );
        assert_eq!(from_root, through_view);
        // A far pointer where the params are: not plain (its target is absolute).
        let mut far = words.clone();
        far[s.content_at * 8..s.content_at * 8 + 8].copy_from_slice(&2u64.to_le_bytes());
        assert!(!plain_subtree(&far, s.content_at, 16));
    }

    #[test]
    fn on_damaged_params_a_plain_subtree_reads_as_from_the_root() {
        // Every byte of a get's call, set to values that move pointers, sizes, kinds and
        // counts: whenever the walk calls the params plain, the view reads what the root
        // reads, errors included.
        let words = call_words(get_call);
        let s = read(&words).expect("a plain call");
        let mut plain = 0;
        for i in 0..words.len() {
            for v in [0u8, 1, 2, 3, 4, 6, 7, 0x7f, 0x80, 0xfe, 0xff] {
                let mut damaged = words.clone();
                damaged[i] = v;
                let Some(d) = read(&damaged) else { continue };
                if plain_subtree(&damaged, d.content_at, 16) {
                    plain += 1;
                    let (from_root, through_view) = both_reads(&damaged, d.content_at);
                    assert_eq!(from_root, through_view, "byte {i} = {v}");
                }
            }
        }
        assert!(plain > words.len(), "{plain}");
        let _ = s;
    }

    #[test]
    fn on_damaged_calls_it_reads_what_capnp_reads_or_nothing() {
        // Every byte of a plain call, set to values that move pointers, sizes and tags:
        // whenever the skeleton reads the damaged call at all, capnp reads the same.
        let words = call_words(plain);
        let mut read_some = 0;
        for i in 0..words.len() {
            for v in [0u8, 1, 2, 3, 0x7f, 0x80, 0xfe, 0xff] {
                let mut damaged = words.clone();
                damaged[i] = v;
                if let Some(s) = read(&damaged) {
                    read_some += 1;
                    assert_eq!(Some(without_place(s)), by_capnp(&damaged), "byte {i} = {v}");
                }
            }
        }
        assert!(read_some > 0);
    }
}
