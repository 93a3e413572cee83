//! [`OwedMap`]: the destination's record of which pages of one address
//! space still have their content only on the source, during the lazy
//! (post-copy) phase of a migration.
//!
//! ```text
//!   region  = an originally owed span, as it lies now in the destination
//!             dest ─────────────── dest_end      (sorted, disjoint)
//!             src  ─────────────── src_end       (disjoint, indexed)
//!             bits  1 1 0 1 0 0 1 …              (1 = owed, 0 = arrived)
//! ```
//!
//! Every owed page has a *source address* (where it was at the freeze; the
//! source serves pages by it) and a *destination address* (where it is now
//! in the restored process). They start out equal; `mremap` in the restored
//! process moves destination addresses ([`OwedMap::remap`]), `munmap` and
//! `MADV_DONTNEED` forget pages ([`OwedMap::remove`]), and a forked child
//! starts from a clone of its parent's map ([`OwedMap::set_owed`]).
//!
//! Each region keeps one bit per page, so a 1 GiB region costs 32 KiB.
//! Invariants, restored after every structural change:
//! - regions are sorted by destination address, disjoint, never empty;
//! - no two regions touch in destination *and* source address at once
//!   (such neighbours are merged), so pieces reported by
//!   [`OwedMap::arrive`] and runs from [`OwedMap::owed_run_at`] are maximal;
//! - source ranges are disjoint, `by_src` lists regions in source order;
//! - each region's `owed` is the number of its set bits, and bits beyond
//!   its length are zero; `remaining` is the sum of all `owed`.
//!
//! Only `std` is used. No method panics on any input: unaligned addresses
//! given to the mutating methods make them do nothing, ranges running past
//! the end of the address space are clipped.

use std::cmp::{max, min};
use std::fmt;

/// Page size in bytes; all addresses handled here are multiples of it.
pub const PAGE: u64 = 4096;

/// What a page is to the map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// Not inside any region: never owed, or forgotten.
    Outside,
    /// Inside a region and its content is still only on the source, which
    /// serves it by source address `src`.
    Owed {
        /// Source address of the page.
        src: u64,
    },
    /// Inside a region and its content has arrived.
    Arrived {
        /// Source address of the page.
        src: u64,
    },
}

/// The destination's record of the pages of one address space still owed
/// by the source. See the [module documentation](self).
#[derive(Clone, Default)]
pub struct OwedMap {
    /// Sorted by `dest`, disjoint, non-empty, coalesced.
    regions: Vec<Region>,
    /// Indices into `regions`, sorted by `src`.
    by_src: Vec<usize>,
    /// Sum of `owed` over all regions.
    remaining: u64,
}

/// One span of pages contiguous in both address spaces.
#[derive(Clone)]
struct Region {
    /// First destination address.
    dest: u64,
    /// First source address.
    src: u64,
    /// Length in pages (> 0).
    pages: u64,
    /// Number of set bits in `bits`.
    owed: u64,
    /// Bit `i` set: page `i` still owed. `words_for(pages)` words; bits at
    /// and beyond `pages` are zero.
    bits: Vec<u64>,
}

impl Region {
    fn dest_end(&self) -> u64 {
        self.dest + self.pages * PAGE
    }

    fn src_end(&self) -> u64 {
        self.src + self.pages * PAGE
    }

    /// Page offsets `[a, b)` of this region that fall in the address range
    /// `[start, end)` measured from `base` (this region's `dest` or `src`).
    /// `start` must be page aligned; `end` page aligned or beyond the
    /// region. Caller ensures overlap.
    fn clip(&self, base: u64, start: u64, end: u64) -> (u64, u64) {
        let base_end = base + self.pages * PAGE;
        let a = (max(start, base) - base) / PAGE;
        let b = (min(end, base_end) - base) / PAGE;
        (a, b)
    }

    /// A copy of pages `[a, b)` as a region of its own.
    fn sub(&self, a: u64, b: u64) -> Region {
        let bits = extract(&self.bits, a, b);
        let owed = bits.iter().map(|w| u64::from(w.count_ones())).sum();
        Region {
            dest: self.dest + a * PAGE,
            src: self.src + a * PAGE,
            pages: b - a,
            owed,
            bits,
        }
    }

    /// Append `other`, which must follow this region in both address
    /// spaces.
    fn append(&mut self, other: &Region) {
        append_bits(&mut self.bits, self.pages, &other.bits, other.pages);
        self.pages += other.pages;
        self.owed += other.owed;
    }
}

impl fmt::Debug for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:#x}..{:#x} <- src {:#x} ({}/{} owed)",
            self.dest,
            self.dest_end(),
            self.src,
            self.owed,
            self.pages
        )
    }
}

impl fmt::Debug for OwedMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OwedMap")
            .field("remaining", &self.remaining)
            .field("regions", &self.regions)
            .finish()
    }
}

// ---------------------------------------------------------------- bitmaps

fn words_for(bits: u64) -> usize {
    bits.div_ceil(64) as usize
}

/// Bits `[lo, hi)` of one word, `lo < hi <= 64`.
fn mask(lo: u64, hi: u64) -> u64 {
    let upper = if hi >= 64 { !0 } else { (1u64 << hi) - 1 };
    upper & (!0u64 << lo)
}

/// Call `f(word index, mask)` for each word overlapping bits `[a, b)`.
fn for_words(a: u64, b: u64, mut f: impl FnMut(usize, u64)) {
    let mut i = a;
    while i < b {
        let w = i / 64;
        let hi = min(64, b - w * 64);
        f(w as usize, mask(i % 64, hi));
        i = w * 64 + hi;
    }
}

/// Set bits `[a, b)`; returns how many were clear.
fn set_range(bits: &mut [u64], a: u64, b: u64) -> u64 {
    let mut n = 0;
    for_words(a, b, |w, m| {
        n += u64::from((!bits[w] & m).count_ones());
        bits[w] |= m;
    });
    n
}

/// Clear bits `[a, b)`; returns how many were set.
fn clear_range(bits: &mut [u64], a: u64, b: u64) -> u64 {
    let mut n = 0;
    for_words(a, b, |w, m| {
        n += u64::from((bits[w] & m).count_ones());
        bits[w] &= !m;
    });
    n
}

fn get(bits: &[u64], i: u64) -> bool {
    bits[(i / 64) as usize] >> (i % 64) & 1 != 0
}

/// First index in `[a, b)` whose bit equals `want`, or `b`.
fn next_bit(bits: &[u64], a: u64, b: u64, want: bool) -> u64 {
    let mut i = a;
    while i < b {
        let w = i / 64;
        let hi = min(64, b - w * 64);
        let word = if want {
            bits[w as usize]
        } else {
            !bits[w as usize]
        };
        let m = word & mask(i % 64, hi);
        if m != 0 {
            return w * 64 + u64::from(m.trailing_zeros());
        }
        i = w * 64 + hi;
    }
    b
}

/// Call `f(start, end)` for each maximal run of bits equal to `want` in
/// `[a, b)`.
fn runs(bits: &[u64], a: u64, b: u64, want: bool, mut f: impl FnMut(u64, u64)) {
    let mut p = a;
    loop {
        let s = next_bit(bits, p, b, want);
        if s >= b {
            return;
        }
        let e = next_bit(bits, s, b, !want);
        f(s, e);
        p = e;
    }
}

/// Bits `[a, b)` as a new bitmap starting at bit 0 (bits beyond zero).
fn extract(bits: &[u64], a: u64, b: u64) -> Vec<u64> {
    let n = b - a;
    let words = words_for(n);
    let base = (a / 64) as usize;
    let shift = a % 64;
    let mut out = vec![0u64; words];
    for (k, o) in out.iter_mut().enumerate() {
        let lo = bits[base + k] >> shift;
        let hi = match bits.get(base + k + 1) {
            Some(&next) if shift != 0 => next << (64 - shift),
            _ => 0,
        };
        *o = lo | hi;
    }
    if n & 63 != 0 {
        if let Some(last) = out.last_mut() {
            *last &= mask(0, n % 64);
        }
    }
    out
}

/// Append `src` (`src_len` bits) to `dst` (`dst_len` bits); both have
/// zero bits beyond their lengths.
fn append_bits(dst: &mut Vec<u64>, dst_len: u64, src: &[u64], src_len: u64) {
    dst.resize(words_for(dst_len + src_len), 0);
    let base = (dst_len / 64) as usize;
    let shift = dst_len % 64;
    for (k, &w) in src.iter().enumerate() {
        dst[base + k] |= w << shift;
        if shift != 0 {
            if let Some(next) = dst.get_mut(base + k + 1) {
                *next |= w >> (64 - shift);
            }
        }
    }
}

/// Whether `x` is a multiple of [`PAGE`].
fn aligned(x: u64) -> bool {
    x & (PAGE - 1) == 0
}

/// Round up to a page boundary; past the last page boundary, `u64::MAX`
/// (beyond every region, which is all the callers need).
fn round_up(x: u64) -> u64 {
    x.checked_add(PAGE - 1)
        .map_or(u64::MAX, |v| v & !(PAGE - 1))
}

/// `addr + pages * PAGE`, saturating at `u64::MAX` (beyond every region).
fn span_end(addr: u64, pages: u64) -> u64 {
    addr.saturating_add(pages.saturating_mul(PAGE))
}

/// Push `[s, e)` onto sorted `out`, merging with a touching last range.
fn push_range(out: &mut Vec<(u64, u64)>, s: u64, e: u64) {
    if let Some(last) = out.last_mut() {
        if last.1 == s {
            last.1 = e;
            return;
        }
    }
    out.push((s, e));
}

// ---------------------------------------------------------------- the map

impl OwedMap {
    /// Spans `(addr, pages)` owed at the switchover; source == destination.
    /// Sorted, non-overlapping input (may touch); adjacent touching spans
    /// are merged into one region. Spans that are unaligned, empty or run
    /// past the end of the address space are skipped; unsorted or
    /// overlapping input is sorted and united.
    pub fn new(spans: &[(u64, u64)]) -> Self {
        let mut v: Vec<(u64, u64)> = spans
            .iter()
            .filter_map(|&(addr, pages)| {
                if pages == 0 || !aligned(addr) {
                    return None;
                }
                Some((addr, addr.checked_add(pages.checked_mul(PAGE)?)?))
            })
            .collect();
        v.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(v.len());
        for (s, e) in v {
            if let Some(last) = merged.last_mut() {
                if s <= last.1 {
                    last.1 = max(last.1, e);
                    continue;
                }
            }
            merged.push((s, e));
        }
        let regions = merged
            .into_iter()
            .map(|(s, e)| {
                let pages = (e - s) / PAGE;
                let mut bits = vec![!0u64; words_for(pages)];
                if pages & 63 != 0 {
                    if let Some(last) = bits.last_mut() {
                        *last = mask(0, pages % 64);
                    }
                }
                Region {
                    dest: s,
                    src: s,
                    pages,
                    owed: pages,
                    bits,
                }
            })
            .collect();
        let mut map = OwedMap {
            regions,
            by_src: Vec::new(),
            remaining: 0,
        };
        map.fixup();
        map
    }

    /// True when the map has no regions at all (nothing owed, nothing to
    /// register with userfaultfd).
    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// Pages still owed.
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    /// Index of the region containing destination address `dest`.
    fn find(&self, dest: u64) -> Option<usize> {
        let i = self.regions.partition_point(|r| r.dest <= dest);
        let i = i.checked_sub(1)?;
        (dest < self.regions[i].dest_end()).then_some(i)
    }

    /// State of the page containing destination address `dest`.
    pub fn lookup(&self, dest: u64) -> Lookup {
        let Some(i) = self.find(dest) else {
            return Lookup::Outside;
        };
        let r = &self.regions[i];
        let p = (dest - r.dest) / PAGE;
        let src = r.src + p * PAGE;
        if get(&r.bits, p) {
            Lookup::Owed { src }
        } else {
            Lookup::Arrived { src }
        }
    }

    /// The run of owed pages starting at destination page `dest` (which
    /// must itself be owed), contiguous in both source and destination
    /// addresses, at most `max` pages: `(src, pages)`; None if `dest` is
    /// not owed or `max` is 0. An unaligned `dest` means the page
    /// containing it.
    pub fn owed_run_at(&self, dest: u64, max: u64) -> Option<(u64, u64)> {
        if max == 0 {
            return None;
        }
        let dest = dest & !(PAGE - 1);
        let r = &self.regions[self.find(dest)?];
        let p = (dest - r.dest) / PAGE;
        if !get(&r.bits, p) {
            return None;
        }
        // Regions touching in both address spaces are merged, so a run
        // never continues into the next region.
        let lim = min(r.pages, p.saturating_add(max));
        let e = next_bit(&r.bits, p, lim, false);
        Some((r.src + p * PAGE, e - p))
    }

    /// Pages at source address `src` (`pages` pages) arrived: for every
    /// piece of them still owed, call `f(dest, src, pages)` (pieces
    /// contiguous in both address spaces, maximal, in source order) and
    /// mark it arrived. Returns the number of pages newly marked arrived.
    /// An unaligned `src` is ignored (returns 0, `f` is not called).
    pub fn arrive(&mut self, src: u64, pages: u64, mut f: impl FnMut(u64, u64, u64)) -> u64 {
        if !aligned(src) || pages == 0 {
            return 0;
        }
        let end = span_end(src, pages);
        let regions = &mut self.regions;
        let first = self
            .by_src
            .partition_point(|&i| regions[i].src_end() <= src);
        let mut total = 0;
        for &i in &self.by_src[first..] {
            let r = &mut regions[i];
            if r.src >= end {
                break;
            }
            let (a, b) = r.clip(r.src, src, end);
            runs(&r.bits, a, b, true, |s, e| {
                f(r.dest + s * PAGE, r.src + s * PAGE, e - s);
            });
            let n = clear_range(&mut r.bits, a, b);
            r.owed -= n;
            total += n;
        }
        self.remaining -= total;
        total
    }

    /// Cut the destination range `[start, end)` (`start` aligned, `end`
    /// aligned or beyond every region) out of the map; returns the pieces
    /// cut out, sorted, if `keep` (otherwise nothing). Leaves `by_src` and
    /// `remaining` stale: call [`Self::fixup`].
    fn take(&mut self, start: u64, end: u64, keep: bool) -> Vec<Region> {
        let mut taken = Vec::new();
        let lo = self.regions.partition_point(|r| r.dest_end() <= start);
        let hi = self.regions.partition_point(|r| r.dest < end);
        if lo >= hi {
            return taken;
        }
        let mut replace = Vec::with_capacity(2);
        for r in self.regions.drain(lo..hi) {
            let (a, b) = r.clip(r.dest, start, end);
            if a > 0 {
                replace.push(r.sub(0, a));
            }
            if b < r.pages {
                replace.push(r.sub(b, r.pages));
            }
            if keep {
                if a == 0 && b == r.pages {
                    taken.push(r);
                } else {
                    taken.push(r.sub(a, b));
                }
            }
        }
        self.regions.splice(lo..lo, replace);
        taken
    }

    /// Restore the invariants after a structural change: merge regions
    /// touching in both address spaces, rebuild the source index and the
    /// counter.
    fn fixup(&mut self) {
        let mut out: Vec<Region> = Vec::with_capacity(self.regions.len());
        for r in std::mem::take(&mut self.regions) {
            if r.pages == 0 {
                continue;
            }
            if let Some(last) = out.last_mut() {
                if last.dest_end() == r.dest && last.src_end() == r.src {
                    last.append(&r);
                    continue;
                }
            }
            out.push(r);
        }
        self.regions = out;
        let regions = &self.regions;
        self.by_src = (0..regions.len()).collect();
        self.by_src.sort_unstable_by_key(|&i| regions[i].src);
        self.remaining = regions.iter().map(|r| r.owed).sum();
    }

    /// Mark the destination range [start, end) as not owed any more and
    /// forget it entirely (munmap, MADV_DONTNEED/REMOVE): pages there are
    /// now `Outside` (owed or arrived alike). Splits regions as needed.
    /// `end` is rounded up to a page boundary (as the kernel rounds
    /// lengths); an unaligned `start` is ignored.
    pub fn remove(&mut self, start: u64, end: u64) {
        if !aligned(start) {
            return;
        }
        let end = round_up(end);
        if end <= start {
            return;
        }
        self.take(start, end, false);
        self.fixup();
    }

    /// `mremap` moved the destination range [from, from+len) to
    /// [to, to+len): regions (or parts of them) move with it, keeping
    /// their source addresses and owed bits; anything the map had at
    /// [to, to+len) before is dropped first (the kernel unmaps the target).
    /// The two ranges may overlap. `len` is rounded up to a page boundary;
    /// unaligned `from` or `to`, or ranges past the end of the address
    /// space, are ignored.
    pub fn remap(&mut self, from: u64, to: u64, len: u64) {
        if !aligned(from) || !aligned(to) || from == to {
            return;
        }
        let Some(len) = len.checked_add(PAGE - 1).map(|l| l & !(PAGE - 1)) else {
            return;
        };
        let (Some(from_end), Some(to_end)) = (from.checked_add(len), to.checked_add(len)) else {
            return;
        };
        if len == 0 {
            return;
        }
        let mut moved = self.take(from, from_end, true);
        self.take(to, to_end, false);
        for r in &mut moved {
            r.dest = r.dest - from + to;
        }
        self.regions.extend(moved);
        self.regions.sort_unstable_by_key(|r| r.dest);
        self.fixup();
    }

    /// Mark destination pages [dest, dest + pages*PAGE) inside regions as
    /// owed again (a forked child missing pages its parent had); pages
    /// outside regions are ignored. Returns how many pages changed from
    /// arrived to owed. An unaligned `dest` is ignored (returns 0).
    pub fn set_owed(&mut self, dest: u64, pages: u64) -> u64 {
        if !aligned(dest) || pages == 0 {
            return 0;
        }
        let end = span_end(dest, pages);
        let first = self.regions.partition_point(|r| r.dest_end() <= dest);
        let mut total = 0;
        for r in &mut self.regions[first..] {
            if r.dest >= end {
                break;
            }
            let (a, b) = r.clip(r.dest, dest, end);
            let n = set_range(&mut r.bits, a, b);
            r.owed += n;
            total += n;
        }
        self.remaining += total;
        total
    }

    /// Destination ranges `(start, end)` of all regions (owed or not),
    /// sorted, adjacent ones merged — what is registered with userfaultfd.
    pub fn region_ranges(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::with_capacity(self.regions.len());
        for r in &self.regions {
            push_range(&mut out, r.dest, r.dest_end());
        }
        out
    }

    fn bit_ranges(&self, want: bool) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        for r in &self.regions {
            if (want && r.owed == 0) || (!want && r.owed == r.pages) {
                continue;
            }
            runs(&r.bits, 0, r.pages, want, |s, e| {
                push_range(&mut out, r.dest + s * PAGE, r.dest + e * PAGE);
            });
        }
        out
    }

    /// Destination ranges `(start, end)` of arrived pages, sorted, merged.
    pub fn arrived_ranges(&self) -> Vec<(u64, u64)> {
        self.bit_ranges(false)
    }

    /// Destination ranges `(start, end)` of owed pages, sorted, merged.
    pub fn owed_ranges(&self) -> Vec<(u64, u64)> {
        self.bit_ranges(true)
    }

    /// *Source* ranges `(start, end)` of owed pages, sorted by source
    /// address, touching ones merged: what the source must still send for
    /// this address space (a resumed lazy phase tells it).
    pub fn owed_src_ranges(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        for &i in &self.by_src {
            let r = &self.regions[i];
            if r.owed == 0 {
                continue;
            }
            runs(&r.bits, 0, r.pages, true, |s, e| {
                push_range(&mut out, r.src + s * PAGE, r.src + e * PAGE);
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const B: u64 = 0x7f00_0000_0000;

    fn a(p: u64) -> u64 {
        B + p * PAGE
    }

    /// Check every internal invariant.
    fn check(m: &OwedMap) {
        let mut total = 0;
        for (i, r) in m.regions.iter().enumerate() {
            assert!(r.pages > 0, "empty region {r:?}");
            assert_eq!(r.dest % PAGE, 0);
            assert_eq!(r.src % PAGE, 0);
            assert_eq!(r.bits.len(), words_for(r.pages), "{r:?}");
            if r.pages & 63 != 0 {
                assert_eq!(r.bits.last().unwrap() & !mask(0, r.pages % 64), 0);
            }
            let count: u64 = r.bits.iter().map(|w| u64::from(w.count_ones())).sum();
            assert_eq!(count, r.owed, "{r:?}");
            total += count;
            if i > 0 {
                let p = &m.regions[i - 1];
                assert!(p.dest_end() <= r.dest, "unsorted {p:?} {r:?}");
                assert!(
                    !(p.dest_end() == r.dest && p.src_end() == r.src),
                    "not coalesced {p:?} {r:?}"
                );
            }
        }
        assert_eq!(total, m.remaining);
        assert_eq!(m.by_src.len(), m.regions.len());
        let mut seen = vec![false; m.regions.len()];
        for w in m.by_src.windows(2) {
            let (x, y) = (&m.regions[w[0]], &m.regions[w[1]]);
            assert!(x.src_end() <= y.src, "source overlap {x:?} {y:?}");
        }
        for &i in &m.by_src {
            assert!(!seen[i]);
            seen[i] = true;
        }
    }

    fn pieces(m: &mut OwedMap, src: u64, pages: u64) -> (u64, Vec<(u64, u64, u64)>) {
        let mut v = Vec::new();
        let n = m.arrive(src, pages, |d, s, p| v.push((d, s, p)));
        (n, v)
    }

    #[test]
    fn new_merges_and_sanitises() {
        let m = OwedMap::new(&[(a(0), 4), (a(4), 2), (a(10), 1)]);
        check(&m);
        assert_eq!(m.regions.len(), 2);
        assert_eq!(m.remaining(), 7);
        assert_eq!(m.region_ranges(), vec![(a(0), a(6)), (a(10), a(11))]);
        assert!(!m.is_empty());

        // Unsorted, overlapping, unaligned, empty, overflowing.
        let m = OwedMap::new(&[
            (a(10), 2),
            (a(0), 4),
            (a(2), 4),
            (a(20) + 1, 3),
            (a(30), 0),
            (!(PAGE - 1), 2),
            (0, u64::MAX),
        ]);
        check(&m);
        assert_eq!(m.region_ranges(), vec![(a(0), a(6)), (a(10), a(12))]);
        assert_eq!(m.remaining(), 8);

        let m = OwedMap::new(&[]);
        check(&m);
        assert!(m.is_empty());
        assert_eq!(m.remaining(), 0);
        assert!(OwedMap::default().is_empty());
        // The very last page of the address space is representable.
        let top = !(PAGE - 1);
        let m = OwedMap::new(&[(top - PAGE, 1), (top, 1)]);
        check(&m);
        assert_eq!(m.remaining(), 1);
        assert_eq!(m.lookup(top - PAGE), Lookup::Owed { src: top - PAGE });
        assert_eq!(m.lookup(top), Lookup::Outside);
    }

    #[test]
    fn lookup_states() {
        let mut m = OwedMap::new(&[(a(0), 4)]);
        assert_eq!(m.lookup(a(0)), Lookup::Owed { src: a(0) });
        assert_eq!(m.lookup(a(3) + 17), Lookup::Owed { src: a(3) });
        assert_eq!(m.lookup(a(4)), Lookup::Outside);
        assert_eq!(m.lookup(a(0) - 1), Lookup::Outside);
        assert_eq!(m.lookup(0), Lookup::Outside);
        assert_eq!(m.lookup(u64::MAX), Lookup::Outside);
        m.arrive(a(1), 1, |_, _, _| {});
        assert_eq!(m.lookup(a(1) + 5), Lookup::Arrived { src: a(1) });
        assert_eq!(OwedMap::default().lookup(a(0)), Lookup::Outside);
    }

    #[test]
    fn owed_run_at_limits() {
        let mut m = OwedMap::new(&[(a(0), 10), (a(20), 3)]);
        assert_eq!(m.owed_run_at(a(0), 100), Some((a(0), 10)));
        assert_eq!(m.owed_run_at(a(2), 3), Some((a(2), 3)));
        assert_eq!(m.owed_run_at(a(2) + 99, 3), Some((a(2), 3)));
        assert_eq!(m.owed_run_at(a(9), u64::MAX), Some((a(9), 1)));
        assert_eq!(m.owed_run_at(a(0), 0), None);
        assert_eq!(m.owed_run_at(a(10), 5), None);
        m.arrive(a(5), 1, |_, _, _| {});
        assert_eq!(m.owed_run_at(a(0), 100), Some((a(0), 5)));
        assert_eq!(m.owed_run_at(a(5), 100), None);
        assert_eq!(m.owed_run_at(a(6), 100), Some((a(6), 4)));
        // Move pages 20..23 right after page 10: touching in destination
        // but not in source, so the run stops at the region boundary.
        m.remap(a(20), a(10), 3 * PAGE);
        check(&m);
        assert_eq!(m.owed_run_at(a(6), 100), Some((a(6), 4)));
        assert_eq!(m.owed_run_at(a(10), 100), Some((a(20), 3)));
        // Runs longer than 64 pages cross bitmap words.
        let m = OwedMap::new(&[(a(0), 300)]);
        assert_eq!(m.owed_run_at(a(3), 200), Some((a(3), 200)));
        assert_eq!(m.owed_run_at(a(3), 1000), Some((a(3), 297)));
    }

    #[test]
    fn arrive_reports_pieces_in_source_order() {
        let mut m = OwedMap::new(&[(a(0), 8), (a(10), 4)]);
        assert_eq!(pieces(&mut m, a(2), 2), (2, vec![(a(2), a(2), 2)]));
        assert_eq!(m.remaining(), 10);
        // Spanning a hole, already-arrived pages and two regions.
        let (n, v) = pieces(&mut m, a(0), 12);
        assert_eq!(n, 8);
        assert_eq!(v, vec![(a(0), a(0), 2), (a(4), a(4), 4), (a(10), a(10), 2)]);
        assert_eq!(pieces(&mut m, a(0), 12), (0, vec![]));
        assert_eq!(m.remaining(), 2);
        // Unaligned / empty / overflowing requests.
        assert_eq!(pieces(&mut m, a(12) + 1, 2), (0, vec![]));
        assert_eq!(pieces(&mut m, a(12), 0), (0, vec![]));
        assert_eq!(
            pieces(&mut m, a(12), u64::MAX),
            (2, vec![(a(12), a(12), 2)])
        );
        assert_eq!(m.remaining(), 0);
        check(&m);

        // After a move, pieces are reported in source order with their
        // new destination addresses.
        let mut m = OwedMap::new(&[(a(0), 8)]);
        m.remap(a(0), a(100), 4 * PAGE); // src 0..4 now at 100..104
        m.remap(a(4), a(50), 4 * PAGE); // src 4..8 now at 50..54
        check(&m);
        let (n, v) = pieces(&mut m, a(2), 4);
        assert_eq!(n, 4);
        assert_eq!(v, vec![(a(102), a(2), 2), (a(50), a(4), 2)]);
        check(&m);
    }

    #[test]
    fn remove_splits_and_forgets() {
        let mut m = OwedMap::new(&[(a(0), 100)]);
        m.arrive(a(10), 5, |_, _, _| {});
        m.remove(a(12), a(50));
        check(&m);
        assert_eq!(m.region_ranges(), vec![(a(0), a(12)), (a(50), a(100))]);
        assert_eq!(m.lookup(a(20)), Lookup::Outside);
        assert_eq!(m.lookup(a(11)), Lookup::Arrived { src: a(11) });
        assert_eq!(m.lookup(a(50)), Lookup::Owed { src: a(50) });
        assert_eq!(m.remaining(), 10 + 50);
        // Unaligned end rounds up; unaligned start is ignored.
        m.remove(a(98), a(98) + 1);
        assert_eq!(
            m.region_ranges(),
            vec![(a(0), a(12)), (a(50), a(98)), (a(99), a(100))]
        );
        m.remove(a(0) + 1, a(5));
        assert_eq!(m.remaining(), 10 + 49);
        // Empty and reversed ranges do nothing; huge ones clip.
        m.remove(a(5), a(5));
        m.remove(a(6), a(5));
        assert_eq!(m.remaining(), 10 + 49);
        m.remove(a(60), u64::MAX);
        check(&m);
        assert_eq!(m.region_ranges(), vec![(a(0), a(12)), (a(50), a(60))]);
        m.remove(0, u64::MAX);
        check(&m);
        assert!(m.is_empty());
        assert_eq!(m.remaining(), 0);
    }

    #[test]
    fn remap_moves_drops_target_and_overlaps() {
        let mut m = OwedMap::new(&[(a(0), 10), (a(20), 10)]);
        m.arrive(a(1), 1, |_, _, _| {});
        // Move 0..4 onto 22..26: the target's pages are dropped.
        m.remap(a(0), a(22), 4 * PAGE);
        check(&m);
        assert_eq!(m.lookup(a(0)), Lookup::Outside);
        assert_eq!(m.lookup(a(22)), Lookup::Owed { src: a(0) });
        assert_eq!(m.lookup(a(23)), Lookup::Arrived { src: a(1) });
        assert_eq!(m.lookup(a(26)), Lookup::Owed { src: a(26) });
        assert_eq!(m.remaining(), 6 + 3 + 2 + 4);
        // Moving back restores one region per original span.
        m.remap(a(22), a(0), 4 * PAGE);
        check(&m);
        assert_eq!(m.regions.len(), 3);
        assert_eq!(
            m.region_ranges(),
            vec![(a(0), a(10)), (a(20), a(22)), (a(26), a(30))]
        );

        // Overlapping move right by 2 and left by 3.
        let mut m = OwedMap::new(&[(a(0), 10)]);
        m.remap(a(0), a(2), 10 * PAGE);
        check(&m);
        assert_eq!(m.region_ranges(), vec![(a(2), a(12))]);
        assert_eq!(m.lookup(a(2)), Lookup::Owed { src: a(0) });
        assert_eq!(m.lookup(a(11)), Lookup::Owed { src: a(9) });
        m.remap(a(5), a(2), 4 * PAGE); // 5..9 -> 2..6; old 2..5 dropped
        check(&m);
        assert_eq!(m.lookup(a(2)), Lookup::Owed { src: a(3) });
        assert_eq!(m.lookup(a(5)), Lookup::Owed { src: a(6) });
        assert_eq!(m.lookup(a(6)), Lookup::Outside);
        assert_eq!(m.lookup(a(9)), Lookup::Owed { src: a(7) });
        assert_eq!(m.remaining(), 4 + 3);

        // Ignored: unaligned, zero length, same place, overflow.
        let before = format!("{m:?}");
        m.remap(a(2) + 1, a(40), PAGE);
        m.remap(a(2), a(40) + 1, PAGE);
        m.remap(a(2), a(40), 0);
        m.remap(a(2), a(2), PAGE);
        m.remap(a(2), !(PAGE - 1), 2 * PAGE);
        m.remap(a(2), a(40), u64::MAX);
        assert_eq!(format!("{m:?}"), before);
        // Unaligned length rounds up.
        m.remap(a(2), a(40), 1);
        assert_eq!(m.lookup(a(40)), Lookup::Owed { src: a(3) });
        assert_eq!(m.lookup(a(41)), Lookup::Outside);
        check(&m);
    }

    #[test]
    fn set_owed_counts_changes() {
        let mut m = OwedMap::new(&[(a(0), 10), (a(20), 10)]);
        m.arrive(a(0), 30, |_, _, _| {});
        assert_eq!(m.remaining(), 0);
        assert_eq!(m.set_owed(a(5), 20), 10);
        assert_eq!(m.remaining(), 10);
        assert_eq!(m.set_owed(a(5), 20), 0);
        assert_eq!(m.owed_ranges(), vec![(a(5), a(10)), (a(20), a(25))]);
        assert_eq!(m.set_owed(a(5) + 1, 20), 0);
        assert_eq!(m.set_owed(a(5), 0), 0);
        assert_eq!(m.set_owed(a(29), u64::MAX), 1);
        assert_eq!(m.set_owed(0, 3), 0);
        check(&m);
    }

    #[test]
    fn ranges_merge_across_regions() {
        let mut m = OwedMap::new(&[(a(0), 8)]);
        // Swap the halves: two regions touching in destination only.
        m.remap(a(4), a(100), 4 * PAGE);
        m.remap(a(0), a(4), 4 * PAGE);
        m.remap(a(100), a(0), 4 * PAGE);
        check(&m);
        assert_eq!(m.regions.len(), 2);
        assert_eq!(m.region_ranges(), vec![(a(0), a(8))]);
        assert_eq!(m.owed_ranges(), vec![(a(0), a(8))]);
        assert_eq!(m.arrived_ranges(), vec![]);
        m.arrive(a(3), 2, |_, _, _| {}); // dest 7 and dest 0
        assert_eq!(m.arrived_ranges(), vec![(a(0), a(1)), (a(7), a(8))]);
        assert_eq!(m.owed_ranges(), vec![(a(1), a(7))]);
        let c = m.clone();
        m.arrive(a(0), 8, |_, _, _| {});
        assert_eq!(m.owed_ranges(), vec![]);
        assert_eq!(m.arrived_ranges(), vec![(a(0), a(8))]);
        assert_eq!(c.owed_ranges(), vec![(a(1), a(7))]);
        assert_eq!(c.remaining(), 6);
    }

    #[test]
    fn one_gib_is_cheap() {
        let pages = 262_144;
        let mut m = OwedMap::new(&[(a(0), pages)]);
        assert_eq!(m.regions[0].bits.len(), 4096);
        let mut calls = 0;
        let mut done = 0;
        let mut s = 0;
        while s < pages {
            done += m.arrive(a(s), 3, |_, _, _| calls += 1);
            s += 7;
        }
        assert_eq!(done, m.regions[0].pages - m.remaining());
        m.remove(a(1000), a(pages - 1000));
        m.remap(a(0), a(pages + 3), 1000 * PAGE);
        m.set_owed(a(0), 2 * pages);
        check(&m);
        assert_eq!(m.remaining(), 2000);
        assert!(calls > 0);
    }

    #[test]
    fn bit_helpers() {
        let mut bits = vec![0u64; 4];
        assert_eq!(set_range(&mut bits, 3, 200), 197);
        assert_eq!(set_range(&mut bits, 0, 256), 59);
        assert_eq!(clear_range(&mut bits, 60, 130), 70);
        assert_eq!(next_bit(&bits, 0, 256, false), 60);
        assert_eq!(next_bit(&bits, 60, 256, true), 130);
        assert_eq!(next_bit(&bits, 60, 100, true), 100);
        for (x, y) in [
            (0u64, 256u64),
            (5, 70),
            (64, 128),
            (63, 65),
            (130, 256),
            (7, 7),
        ] {
            let e = extract(&bits, x, y);
            assert_eq!(e.len(), words_for(y - x));
            for i in 0..(y - x) {
                assert_eq!(get(&e, i), get(&bits, x + i), "extract {x}..{y} bit {i}");
            }
            for split in [x, (x + y) / 2, y] {
                let mut l = extract(&bits, x, split);
                let r = extract(&bits, split, y);
                append_bits(&mut l, split - x, &r, y - split);
                assert_eq!(l, e, "append {x}..{split}..{y}");
            }
        }
    }

    // ------------------------------------------------------ model test

    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// Destination address -> (source address, owed).
    type Model = HashMap<u64, (u64, bool)>;

    /// Pages (relative to `B`) the test works in.
    const WIN: u64 = 192;

    fn compare(m: &OwedMap, model: &Model, ctx: &str) {
        check(m);
        let owed = model.values().filter(|v| v.1).count() as u64;
        assert_eq!(m.remaining(), owed, "{ctx}: remaining");
        // One pass over the window (every model page lies inside it) gives
        // the expected lookups and ranges.
        let (mut want_owed, mut want_arrived, mut want_regions) = (vec![], vec![], vec![]);
        // Source addresses of owed pages, in source order.
        let mut owed_src: Vec<u64> = model.values().filter(|v| v.1).map(|v| v.0).collect();
        owed_src.sort_unstable();
        let mut want_src = vec![];
        for s in owed_src {
            push_range(&mut want_src, s, s + PAGE);
        }
        assert_eq!(m.owed_src_ranges(), want_src, "{ctx}: owed source ranges");
        let mut inside = 0;
        for p in 0..WIN + 4 {
            let d = a(p);
            let want = match model.get(&d) {
                None => Lookup::Outside,
                Some(&(src, owed)) => {
                    inside += 1;
                    push_range(&mut want_regions, d, d + PAGE);
                    if owed {
                        push_range(&mut want_owed, d, d + PAGE);
                        Lookup::Owed { src }
                    } else {
                        push_range(&mut want_arrived, d, d + PAGE);
                        Lookup::Arrived { src }
                    }
                }
            };
            assert_eq!(m.lookup(d), want, "{ctx}: lookup page {p} in {m:?}");
        }
        assert_eq!(inside, model.len(), "{ctx}: model left the window");
        assert_eq!(m.owed_ranges(), want_owed, "{ctx}: owed");
        assert_eq!(m.arrived_ranges(), want_arrived, "{ctx}: arrived");
        assert_eq!(m.region_ranges(), want_regions, "{ctx}: regions");
        assert_eq!(m.is_empty(), model.is_empty(), "{ctx}: is_empty");
    }

    fn seed(rng: &mut XorShift) -> (OwedMap, Model) {
        let mut spans = Vec::new();
        let mut p = rng.below(8);
        while p < WIN {
            let len = 1 + rng.below(60);
            let len = min(len, WIN - p);
            spans.push((a(p), len));
            p += len + [0, 0, 1, 5, 20][rng.below(5) as usize];
        }
        let m = OwedMap::new(&spans);
        let mut model = Model::new();
        for &(s, n) in &spans {
            for i in 0..n {
                model.insert(s + i * PAGE, (s + i * PAGE, true));
            }
        }
        (m, model)
    }

    /// One random operation on both the map and the model, checking the
    /// results the operation returns.
    fn step(rng: &mut XorShift, m: &mut OwedMap, model: &mut Model, ctx: &str) {
        match rng.below(100) {
            0..=34 => {
                let src = a(rng.below(WIN));
                let pages = 1 + rng.below(24);
                let end = src + pages * PAGE;
                let mut hits: Vec<(u64, u64)> = model
                    .iter()
                    .filter(|(_, &(s, owed))| owed && s >= src && s < end)
                    .map(|(&d, &(s, _))| (s, d))
                    .collect();
                hits.sort_unstable();
                let mut want: Vec<(u64, u64, u64)> = Vec::new();
                for (s, d) in hits {
                    model.get_mut(&d).unwrap().1 = false;
                    if let Some(last) = want.last_mut() {
                        if last.0 + last.2 * PAGE == d && last.1 + last.2 * PAGE == s {
                            last.2 += 1;
                            continue;
                        }
                    }
                    want.push((d, s, 1));
                }
                let (n, got) = pieces(m, src, pages);
                assert_eq!(got, want, "{ctx}: arrive {src:#x} {pages}");
                assert_eq!(
                    n,
                    want.iter().map(|w| w.2).sum::<u64>(),
                    "{ctx}: arrive count"
                );
            }
            35..=44 => {
                let start = a(rng.below(WIN));
                let end = start + rng.below(24) * PAGE;
                model.retain(|&d, _| d < start || d >= end);
                m.remove(start, end);
            }
            45..=64 => {
                let len = 1 + rng.below(32);
                let from = rng.below(WIN - len + 1);
                let to = if rng.below(2) == 0 {
                    rng.below(WIN - len + 1)
                } else {
                    // Overlapping move.
                    let delta = rng.below(2 * len + 1);
                    (from + delta).saturating_sub(len).min(WIN - len)
                };
                let (from, to) = (a(from), a(to));
                let bytes = len * PAGE;
                let moved: Vec<(u64, (u64, bool))> = model
                    .iter()
                    .filter(|(&d, _)| d >= from && d < from + bytes)
                    .map(|(&d, &v)| (d, v))
                    .collect();
                model.retain(|&d, _| !(d >= from && d < from + bytes));
                model.retain(|&d, _| !(d >= to && d < to + bytes));
                for (d, v) in moved {
                    model.insert(d - from + to, v);
                }
                m.remap(from, to, bytes);
            }
            65..=79 => {
                let dest = a(rng.below(WIN));
                let pages = 1 + rng.below(40);
                let mut want = 0;
                for (&d, v) in model.iter_mut() {
                    if d >= dest && d < dest + pages * PAGE && !v.1 {
                        v.1 = true;
                        want += 1;
                    }
                }
                assert_eq!(m.set_owed(dest, pages), want, "{ctx}: set_owed");
            }
            80..=91 => {
                let dest = a(rng.below(WIN)) + rng.below(PAGE);
                let max = rng.below(40);
                let page = dest & !(PAGE - 1);
                let want = match model.get(&page) {
                    Some(&(src, true)) if max > 0 => {
                        let mut n = 1;
                        while n < max
                            && model.get(&(page + n * PAGE)) == Some(&(src + n * PAGE, true))
                        {
                            n += 1;
                        }
                        Some((src, n))
                    }
                    _ => None,
                };
                assert_eq!(m.owed_run_at(dest, max), want, "{ctx}: owed_run_at");
            }
            92..=95 => {
                // Garbage input must change nothing.
                let before = format!("{m:?}");
                let x = a(rng.below(WIN)) + 1 + rng.below(PAGE - 1);
                m.remove(x, x + PAGE);
                m.remap(x, a(0), PAGE);
                m.remap(a(0), x, PAGE);
                assert_eq!(m.set_owed(x, 3), 0);
                assert_eq!(m.arrive(x, 3, |_, _, _| panic!("called")), 0);
                assert_eq!(format!("{m:?}"), before, "{ctx}: garbage changed map");
            }
            _ => {
                // Fork: the clone evolves on its own, the original must not
                // notice.
                let mut child = m.clone();
                let mut child_model = model.clone();
                for _ in 0..3 {
                    step(rng, &mut child, &mut child_model, ctx);
                }
                compare(&child, &child_model, ctx);
                compare(m, model, ctx);
                if rng.below(2) == 0 {
                    *m = child;
                    *model = child_model;
                }
            }
        }
    }

    #[test]
    fn model() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let (mut m, mut model) = seed(&mut rng);
        compare(&m, &model, "seed");
        for i in 0..3000 {
            if i % 400 == 0 || model.len() < 16 {
                (m, model) = seed(&mut rng);
            }
            let ctx = format!("step {i}");
            step(&mut rng, &mut m, &mut model, &ctx);
            compare(&m, &model, &ctx);
        }
    }
}
