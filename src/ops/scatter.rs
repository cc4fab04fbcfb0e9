//! Atom-stage scatters (SPEC steps 2 and 3a): the atomic-number embedding and the atom-to-token
//! merge, forward and backward. Kernels: `cuda/scatter.cu`.
//!
//! Both are many-to-one maps from atoms to segments (rows of the embedding table, tokens). Their
//! sums run as gathers over a CSR of each segment's atoms in ascending order, built once on the
//! host from the map ([`EmbeddingIndex`], [`TokenMap`]) and uploaded once
//! ([`DeviceEmbeddingIndex`], [`DeviceTokenMap`]): one thread per output element adds its atoms in
//! list order, so there are no atomics and results are bitwise reproducible on every launch
//! shape. The maps are checked when they are built, with errors naming the atom, so the kernels
//! need no checks and no per-call download.
//!
//! Features are per frame and every frame shares the map (one topology): atoms `[F, A, H]`
//! (scalars) or `[F, A, C, H]` (C = 3 for vectors), tokens `[F, R, H]` or `[F, R, C, H]`; a
//! single frame may drop its leading dimension (`[A, H]`).

use super::{same_device, Real, CPU_CHUNK};
use crate::device::Device;
use crate::kernels::scatter as k;
use crate::launch::{launch, KernelArgs, LaunchConfig};
use crate::tensor::Tensor;
use anyhow::{bail, ensure, Result};
use rayon::prelude::*;

const THREADS: u32 = 256;

/// Entries of a table row's atom list per chunk of the embedding backward's first pass. A common
/// element (carbon: about half of a protein's heavy atoms) is summed by many threads, one chunk
/// each, and the chunks by a second pass; both orders are fixed by the index alone.
pub const EMBEDDING_CHUNK: usize = 32;

/// The token id that leaves an atom out of a [`TokenMap`] built by [`TokenMap::new`].
pub const EXCLUDED: u32 = u32::MAX;

/// Whether a token gets the sum or the mean of its atoms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduce {
    /// `tok[r] = sum of the atoms of r`
    Sum,
    /// `tok[r] = mean of the atoms of r` (0 for a token without atoms)
    Mean,
}

impl Reduce {
    /// The kernels' `mean` flag.
    fn flag(self) -> i32 {
        match self {
            Self::Sum => 0,
            Self::Mean => 1,
        }
    }
}

/// CSR of a many-to-one map by counting sort: `row_ptr [S + 1]` and the members of each
/// segment, ascending. Negative segment ids are left out. The ids must be below `segments`.
fn group_by_segment(segment_of: &[i32], segments: usize) -> (Vec<i32>, Vec<i32>) {
    let mut row_ptr = vec![0i32; segments + 1];
    for &s in segment_of.iter().filter(|&&s| s >= 0) {
        row_ptr[s as usize + 1] += 1;
    }
    for r in 0..segments {
        row_ptr[r + 1] += row_ptr[r];
    }
    let mut cursor = row_ptr[..segments].to_vec();
    let mut members = vec![0i32; row_ptr[segments] as usize];
    for (a, &s) in segment_of.iter().enumerate() {
        if s >= 0 {
            let c = &mut cursor[s as usize];
            members[*c as usize] = a as i32;
            *c += 1;
        }
    }
    (row_ptr, members)
}

/// Checks that a count fits the kernels' 32-bit indices.
fn fits_i32(op: &str, what: &str, n: usize) -> Result<()> {
    ensure!(
        n <= i32::MAX as usize,
        "{op}: {n} {what} do not fit 32-bit indices"
    );
    Ok(())
}

// ------------------------------------------------------------------------------ embedding --

/// Which row of an embedding table each atom reads (its atomic number, say), checked against the
/// table's size, with the CSR of each row's atoms that the backward pass gathers over.
#[derive(Clone, Debug, PartialEq)]
pub struct EmbeddingIndex {
    vocab: usize,
    index: Vec<i32>,
    row_ptr: Vec<i32>,
    atom_idx: Vec<i32>,
    chunk_begin: Vec<i32>,
    chunk_ptr: Vec<i32>,
}

/// The index arrays of an [`EmbeddingIndex`] as host slices: what the CPU twins take.
#[derive(Clone, Copy, Debug)]
pub struct EmbeddingIndexView<'a> {
    /// Rows V of the table.
    pub vocab: usize,
    /// `[N]`: the table row of each atom.
    pub index: &'a [i32],
    /// `[N]`: the atoms grouped by row, ascending within a row.
    pub atom_idx: &'a [i32],
    /// `[chunks + 1]`: chunk `c` is `atom_idx[chunk_begin[c]..chunk_begin[c + 1]]`.
    pub chunk_begin: &'a [i32],
    /// `[V + 1]`: the chunks of row `r` are `chunk_ptr[r]..chunk_ptr[r + 1]`.
    pub chunk_ptr: &'a [i32],
}

impl EmbeddingIndex {
    /// Checks `index` (the table row of each atom) against a table of `vocab` rows and builds the
    /// row -> atoms CSR. An index outside `0..vocab` is an error naming the atom.
    pub fn new(index: &[i32], vocab: usize) -> Result<Self> {
        let op = "EmbeddingIndex";
        fits_i32(op, "atoms", index.len())?;
        fits_i32(op, "table rows", vocab)?;
        if let Some(a) = index.iter().position(|&z| z < 0 || z as usize >= vocab) {
            bail!(
                "{op}: atom {a} has index {}, outside the embedding table's {vocab} rows \
                 (0..{vocab})",
                index[a]
            );
        }
        let (row_ptr, atom_idx) = group_by_segment(index, vocab);
        let mut chunk_begin = Vec::with_capacity(index.len() / EMBEDDING_CHUNK + vocab + 1);
        let mut chunk_ptr = Vec::with_capacity(vocab + 1);
        chunk_ptr.push(0);
        for r in 0..vocab {
            // Rows are contiguous in atom_idx, so each chunk ends where the next one begins.
            chunk_begin.extend((row_ptr[r]..row_ptr[r + 1]).step_by(EMBEDDING_CHUNK));
            chunk_ptr.push(chunk_begin.len() as i32);
        }
        chunk_begin.push(atom_idx.len() as i32);
        Ok(Self {
            vocab,
            index: index.to_vec(),
            row_ptr,
            atom_idx,
            chunk_begin,
            chunk_ptr,
        })
    }

    /// Rows V of the table.
    pub fn vocab(&self) -> usize {
        self.vocab
    }
    /// Atoms N.
    pub fn atoms(&self) -> usize {
        self.index.len()
    }
    /// `[N]`: the table row of each atom.
    pub fn index(&self) -> &[i32] {
        &self.index
    }
    /// `[V + 1]`: the atoms of row `r` are `atom_idx()[row_ptr[r]..row_ptr[r + 1]]`.
    pub fn row_ptr(&self) -> &[i32] {
        &self.row_ptr
    }
    /// `[N]`: the atoms grouped by row, ascending within a row.
    pub fn atom_idx(&self) -> &[i32] {
        &self.atom_idx
    }
    /// Chunks of the backward's first pass.
    pub fn chunks(&self) -> usize {
        self.chunk_begin.len() - 1
    }
    /// The index arrays as slices, for the CPU twins.
    pub fn view(&self) -> EmbeddingIndexView<'_> {
        EmbeddingIndexView {
            vocab: self.vocab,
            index: &self.index,
            atom_idx: &self.atom_idx,
            chunk_begin: &self.chunk_begin,
            chunk_ptr: &self.chunk_ptr,
        }
    }
    /// Uploads the index.
    pub fn to_device(&self, dev: &Device) -> Result<DeviceEmbeddingIndex> {
        Ok(DeviceEmbeddingIndex {
            vocab: self.vocab,
            atoms: self.atoms(),
            chunks: self.chunks(),
            index: Tensor::from_slice(dev, &[self.index.len()], &self.index)?,
            atom_idx: Tensor::from_slice(dev, &[self.atom_idx.len()], &self.atom_idx)?,
            chunk_begin: Tensor::from_slice(dev, &[self.chunk_begin.len()], &self.chunk_begin)?,
            chunk_ptr: Tensor::from_slice(dev, &[self.chunk_ptr.len()], &self.chunk_ptr)?,
        })
    }
}

/// An [`EmbeddingIndex`] on a device: what the embedding kernels read. Made only by
/// [`EmbeddingIndex::to_device`], so its indices are known to be in range.
#[derive(Debug)]
pub struct DeviceEmbeddingIndex {
    vocab: usize,
    atoms: usize,
    chunks: usize,
    index: Tensor<i32>,
    atom_idx: Tensor<i32>,
    chunk_begin: Tensor<i32>,
    chunk_ptr: Tensor<i32>,
}

impl DeviceEmbeddingIndex {
    /// Rows V of the table.
    pub fn vocab(&self) -> usize {
        self.vocab
    }
    /// Atoms N.
    pub fn atoms(&self) -> usize {
        self.atoms
    }
    /// `[N]`: the table row of each atom.
    pub fn index(&self) -> &Tensor<i32> {
        &self.index
    }
    /// The device it lives on.
    pub fn device(&self) -> &Device {
        self.index.device()
    }
    /// Floats of scratch [`embedding_backward_with_scratch`] needs for `hidden` channels (the
    /// first pass's per-chunk partial sums).
    pub fn scratch_len(&self, hidden: usize) -> usize {
        self.chunks * hidden
    }
    /// The index arrays as host slices (cpu and emu; `None` on cuda).
    pub fn host_view(&self) -> Option<EmbeddingIndexView<'_>> {
        Some(EmbeddingIndexView {
            vocab: self.vocab,
            index: self.index.host()?,
            atom_idx: self.atom_idx.host()?,
            chunk_begin: self.chunk_begin.host()?,
            chunk_ptr: self.chunk_ptr.host()?,
        })
    }
}

/// Rows per rayon task when a row is `width` elements wide.
fn rows_per_task(width: usize) -> usize {
    (CPU_CHUNK / width.max(1)).max(1)
}

/// CPU twin of [`embedding_forward`]: `out [F, N, hidden]` from `table [V, hidden]`.
pub fn embedding_forward_host<R: Real>(table: &[R], index: &[i32], out: &mut [R], hidden: usize) {
    let n = index.len();
    if hidden == 0 || n == 0 {
        return;
    }
    out.par_chunks_mut(hidden)
        .with_min_len(rows_per_task(hidden))
        .enumerate()
        .for_each(|(row, o)| {
            let z = index[row % n] as usize;
            o.copy_from_slice(&table[z * hidden..][..hidden]);
        });
}

/// CPU twin of [`embedding_backward`]: `dtable [V, hidden] +=` the sums of `dout
/// [frames, N, hidden]` over each row's atoms and the frames, in the kernels' order (per chunk,
/// atoms ascending with the frames inside; then the chunks of a row in order).
pub fn embedding_backward_host<R: Real>(
    idx: EmbeddingIndexView<'_>,
    dout: &[R],
    dtable: &mut [R],
    frames: usize,
    hidden: usize,
) {
    let atoms = idx.index.len();
    let chunks = idx.chunk_begin.len().saturating_sub(1);
    if hidden == 0 || chunks == 0 {
        return;
    }
    let mut partials = vec![R::of(0.0); chunks * hidden];
    partials
        .par_chunks_mut(hidden)
        .enumerate()
        .for_each(|(c, p)| {
            for &a in &idx.atom_idx[idx.chunk_begin[c] as usize..idx.chunk_begin[c + 1] as usize] {
                for f in 0..frames {
                    let d = &dout[(f * atoms + a as usize) * hidden..][..hidden];
                    for (p, &d) in p.iter_mut().zip(d) {
                        *p = *p + d;
                    }
                }
            }
        });
    dtable
        .par_chunks_mut(hidden)
        .enumerate()
        .for_each(|(r, o)| {
            let cs = idx.chunk_ptr[r] as usize..idx.chunk_ptr[r + 1] as usize;
            if cs.is_empty() {
                return;
            }
            let mut acc = vec![R::of(0.0); hidden];
            for c in cs {
                for (s, &p) in acc.iter_mut().zip(&partials[c * hidden..][..hidden]) {
                    *s = *s + p;
                }
            }
            for (o, s) in o.iter_mut().zip(acc) {
                *o = *o + s;
            }
        });
}

/// Checks the table (`[V, H]`, V = the index's) and atom features (`[N, H]` or `[F, N, H]`);
/// returns (frames, hidden).
fn embedding_dims(
    op: &str,
    index: &DeviceEmbeddingIndex,
    table_name: &str,
    table: &Tensor<f32>,
    feats_name: &str,
    feats: &Tensor<f32>,
) -> Result<(usize, usize)> {
    let &[v, h] = table.shape() else {
        bail!(
            "{op}: {table_name} has shape {:?}, expected [rows, channels]",
            table.shape()
        );
    };
    ensure!(
        v == index.vocab(),
        "{op}: {table_name} has shape {:?} but the index is for a table of {} rows",
        table.shape(),
        index.vocab()
    );
    let (f, n, hf) = match *feats.shape() {
        [n, hf] => (1, n, hf),
        [f, n, hf] => (f, n, hf),
        ref s => {
            bail!("{op}: {feats_name} has shape {s:?}, expected [atoms, H] or [frames, atoms, H]")
        }
    };
    ensure!(
        n == index.atoms() && hf == h,
        "{op}: {feats_name} has shape {:?}, expected [.., {}, {h}] ({} atoms of the index, {h} \
         channels of {table_name})",
        feats.shape(),
        index.atoms(),
        index.atoms()
    );
    fits_i32(op, "channels", h)?;
    fits_i32(op, "frames", f)?;
    Ok((f, h))
}

/// Atomic-number embedding: `out[f, a, :] = table[index[a], :]` for every frame f. `table` is
/// `[V, H]`, `out` `[N, H]` or `[F, N, H]` (the same atoms in every frame). Assigns `out`.
pub fn embedding_forward(
    table: &Tensor<f32>,
    index: &DeviceEmbeddingIndex,
    out: &mut Tensor<f32>,
) -> Result<()> {
    let op = "embedding_forward";
    let dev = same_device(op, index.device(), &[table.device(), out.device()])?;
    let (frames, hidden) = embedding_dims(op, index, "table", table, "out", out)?;
    let total = frames * index.atoms() * hidden;
    if total == 0 {
        return Ok(());
    }
    match dev {
        Device::Cpu => {
            embedding_forward_host(
                table.host().unwrap(),
                index.index().host().unwrap(),
                out.host_mut().unwrap(),
                hidden,
            );
            Ok(())
        }
        _ => launch(
            dev,
            &k::EMBEDDING_FORWARD,
            LaunchConfig::for_elements(total, THREADS),
            KernelArgs::new()
                .input(table)
                .input(index.index())
                .output(out)
                .i64(total as i64)
                .i32(index.atoms() as i32)
                .i32(hidden as i32)
                .i32(index.vocab() as i32),
        ),
    }
}

/// Backward of [`embedding_forward`]: `dtable[r, :] += sum over the frames and the atoms a with
/// index[a] = r of dout[f, a, :]`. ACCUMULATES into `dtable` (a parameter gradient). Two gathers,
/// no atomics: per chunk of [`EMBEDDING_CHUNK`] atoms of a row, then per row over its chunks, so
/// the sum's order is fixed by the index and the result is bitwise reproducible. On cuda and emu
/// this allocates the scratch with `Tensor::zeros` on every call; see
/// [`embedding_backward_with_scratch`] to supply it.
pub fn embedding_backward(
    index: &DeviceEmbeddingIndex,
    dout: &Tensor<f32>,
    dtable: &mut Tensor<f32>,
) -> Result<()> {
    let mut scratch = match dout.device() {
        Device::Cpu => None,
        dev => {
            let h = dtable.shape().last().copied().unwrap_or(0);
            Some(Tensor::zeros(dev, &[index.scratch_len(h).max(1)])?)
        }
    };
    embedding_backward_impl(index, dout, dtable, scratch.as_mut())
}

/// [`embedding_backward`] with caller-provided scratch on the same device, at least
/// [`DeviceEmbeddingIndex::scratch_len`] floats (contents ignored and overwritten; unused on the
/// cpu device).
pub fn embedding_backward_with_scratch(
    index: &DeviceEmbeddingIndex,
    dout: &Tensor<f32>,
    dtable: &mut Tensor<f32>,
    scratch: &mut Tensor<f32>,
) -> Result<()> {
    embedding_backward_impl(index, dout, dtable, Some(scratch))
}

fn embedding_backward_impl(
    index: &DeviceEmbeddingIndex,
    dout: &Tensor<f32>,
    dtable: &mut Tensor<f32>,
    scratch: Option<&mut Tensor<f32>>,
) -> Result<()> {
    let op = "embedding_backward";
    let mut devices = vec![dout.device(), dtable.device()];
    devices.extend(scratch.as_deref().map(|t| t.device()));
    let dev = same_device(op, index.device(), &devices)?.clone();
    let (frames, hidden) = embedding_dims(op, index, "dtable", dtable, "dout", dout)?;
    let partials = index.chunks * hidden;
    if partials == 0 || frames == 0 {
        return Ok(());
    }
    if let Device::Cpu = dev {
        embedding_backward_host(
            index.host_view().unwrap(),
            dout.host().unwrap(),
            dtable.host_mut().unwrap(),
            frames,
            hidden,
        );
        return Ok(());
    }
    let Some(scratch) = scratch else {
        bail!("{op}: no scratch on {}", dev.name());
    };
    ensure!(
        scratch.len() >= partials,
        "{op}: scratch has {} floats, {partials} needed ({} chunks of {hidden} channels)",
        scratch.len(),
        index.chunks
    );
    fits_i32(op, "chunks", index.chunks)?;
    launch(
        &dev,
        &k::EMBEDDING_BACKWARD_PARTIALS,
        LaunchConfig::for_elements(partials, THREADS),
        KernelArgs::new()
            .input(&index.chunk_begin)
            .input(&index.atom_idx)
            .input(dout)
            .output(scratch)
            .i32(index.chunks as i32)
            .i32(index.atoms as i32)
            .i32(frames as i32)
            .i32(hidden as i32),
    )?;
    launch(
        &dev,
        &k::EMBEDDING_BACKWARD_ROWS,
        LaunchConfig::for_elements(index.vocab * hidden, THREADS),
        KernelArgs::new()
            .input(&index.chunk_ptr)
            .input(scratch)
            .output(dtable)
            .i32(index.vocab as i32)
            .i32(hidden as i32),
    )
}

// ---------------------------------------------------------------------------- token merge --

/// The atom -> token map of TMM step a (atoms -> residues, or a custom grouping), checked, with
/// the CSR of each token's atoms that the forward pass gathers over. Atoms may come in any order;
/// atoms may be left out; tokens may have no atom.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenMap {
    tokens: usize,
    token_of_atom: Vec<i32>,
    row_ptr: Vec<i32>,
    atom_idx: Vec<i32>,
}

/// The index arrays of a [`TokenMap`] as host slices: what the CPU twins take.
#[derive(Clone, Copy, Debug)]
pub struct TokenMapView<'a> {
    /// Tokens R.
    pub tokens: usize,
    /// `[A]`: the token of each atom, -1 for an atom left out.
    pub token_of_atom: &'a [i32],
    /// `[R + 1]`: the atoms of token `r` are `atom_idx[row_ptr[r]..row_ptr[r + 1]]`.
    pub row_ptr: &'a [i32],
    /// The included atoms grouped by token, ascending within a token.
    pub atom_idx: &'a [i32],
}

impl TokenMapView<'_> {
    /// Atoms A.
    pub fn atoms(&self) -> usize {
        self.token_of_atom.len()
    }
    fn atoms_of(&self, r: usize) -> &[i32] {
        &self.atom_idx[self.row_ptr[r] as usize..self.row_ptr[r + 1] as usize]
    }
}

impl TokenMap {
    /// A map from the token id of each atom (`token_of_atom[a]` in `0..tokens`, or [`EXCLUDED`]
    /// to leave the atom out): what `Dataset::token_map` gives. An id outside the range is an
    /// error naming the atom.
    pub fn new(token_of_atom: &[u32], tokens: usize) -> Result<Self> {
        Self::build(
            token_of_atom,
            tokens,
            |t| {
                if t == EXCLUDED {
                    Some(-1)
                } else {
                    ((t as usize) < tokens).then_some(t as i32)
                }
            },
            "u32::MAX",
        )
    }

    /// As [`TokenMap::new`], with `tokens` one more than the largest id (every atom's token,
    /// numbered from 0, as the trajectory store numbers residues).
    pub fn from_map(token_of_atom: &[u32]) -> Result<Self> {
        let tokens = token_of_atom
            .iter()
            .filter(|&&t| t != EXCLUDED)
            .max()
            .map_or(0, |&t| t as usize + 1);
        Self::new(token_of_atom, tokens)
    }

    /// As [`TokenMap::new`] with signed ids: -1 leaves an atom out.
    pub fn from_i32(token_of_atom: &[i32], tokens: usize) -> Result<Self> {
        Self::build(
            token_of_atom,
            tokens,
            |t| (t == -1 || (0..tokens as i64).contains(&(t as i64))).then_some(t),
            "-1",
        )
    }

    fn build<T: Copy + std::fmt::Display>(
        token_of_atom: &[T],
        tokens: usize,
        id: impl Fn(T) -> Option<i32>,
        excluded: &str,
    ) -> Result<Self> {
        let op = "TokenMap";
        fits_i32(op, "atoms", token_of_atom.len())?;
        fits_i32(op, "tokens", tokens)?;
        let mut ids = Vec::with_capacity(token_of_atom.len());
        for (a, &t) in token_of_atom.iter().enumerate() {
            match id(t) {
                Some(i) => ids.push(i),
                None => bail!(
                    "{op}: atom {a} maps to token {t}, outside the {tokens} tokens (0..{tokens}; \
                     {excluded} leaves an atom out)"
                ),
            }
        }
        let (row_ptr, atom_idx) = group_by_segment(&ids, tokens);
        Ok(Self {
            tokens,
            token_of_atom: ids,
            row_ptr,
            atom_idx,
        })
    }

    /// Tokens R.
    pub fn tokens(&self) -> usize {
        self.tokens
    }
    /// Atoms A (included or not).
    pub fn atoms(&self) -> usize {
        self.token_of_atom.len()
    }
    /// `[A]`: the token of each atom, -1 for an atom left out.
    pub fn token_of_atom(&self) -> &[i32] {
        &self.token_of_atom
    }
    /// `[R + 1]`: the atoms of token `r` are `atom_idx()[row_ptr[r]..row_ptr[r + 1]]`.
    pub fn row_ptr(&self) -> &[i32] {
        &self.row_ptr
    }
    /// The included atoms grouped by token, ascending within a token.
    pub fn atom_idx(&self) -> &[i32] {
        &self.atom_idx
    }
    /// Atoms of token `r` (what a mean divides by).
    pub fn count(&self, r: usize) -> usize {
        (self.row_ptr[r + 1] - self.row_ptr[r]) as usize
    }
    /// The index arrays as slices, for the CPU twins.
    pub fn view(&self) -> TokenMapView<'_> {
        TokenMapView {
            tokens: self.tokens,
            token_of_atom: &self.token_of_atom,
            row_ptr: &self.row_ptr,
            atom_idx: &self.atom_idx,
        }
    }
    /// Uploads the map.
    pub fn to_device(&self, dev: &Device) -> Result<DeviceTokenMap> {
        Ok(DeviceTokenMap {
            tokens: self.tokens,
            atoms: self.atoms(),
            token_of_atom: Tensor::from_slice(dev, &[self.atoms()], &self.token_of_atom)?,
            row_ptr: Tensor::from_slice(dev, &[self.row_ptr.len()], &self.row_ptr)?,
            atom_idx: Tensor::from_slice(dev, &[self.atom_idx.len()], &self.atom_idx)?,
        })
    }
}

/// A [`TokenMap`] on a device: what the merge kernels read. Made only by
/// [`TokenMap::to_device`], so its indices are known to be in range.
#[derive(Debug)]
pub struct DeviceTokenMap {
    tokens: usize,
    atoms: usize,
    token_of_atom: Tensor<i32>,
    row_ptr: Tensor<i32>,
    atom_idx: Tensor<i32>,
}

impl DeviceTokenMap {
    /// Tokens R.
    pub fn tokens(&self) -> usize {
        self.tokens
    }
    /// Atoms A.
    pub fn atoms(&self) -> usize {
        self.atoms
    }
    /// The device it lives on.
    pub fn device(&self) -> &Device {
        self.row_ptr.device()
    }
    /// The index arrays as host slices (cpu and emu; `None` on cuda).
    pub fn host_view(&self) -> Option<TokenMapView<'_>> {
        Some(TokenMapView {
            tokens: self.tokens,
            token_of_atom: self.token_of_atom.host()?,
            row_ptr: self.row_ptr.host()?,
            atom_idx: self.atom_idx.host()?,
        })
    }
}

/// CPU twin of [`token_merge_forward`]: `x [frames, A, inner]` -> `out [frames, R, inner]`.
pub fn token_merge_forward_host<R: Real>(
    map: TokenMapView<'_>,
    x: &[R],
    out: &mut [R],
    frames: usize,
    inner: usize,
    reduce: Reduce,
) {
    let (atoms, tokens) = (map.atoms(), map.tokens);
    if inner == 0 || tokens == 0 {
        return;
    }
    debug_assert_eq!(out.len(), frames * tokens * inner);
    out.par_chunks_mut(inner)
        .with_min_len(rows_per_task(inner))
        .enumerate()
        .for_each(|(fr, o)| {
            let (f, r) = (fr / tokens, fr % tokens);
            o.fill(R::of(0.0));
            let members = map.atoms_of(r);
            for &a in members {
                let xa = &x[(f * atoms + a as usize) * inner..][..inner];
                for (o, &v) in o.iter_mut().zip(xa) {
                    *o = *o + v;
                }
            }
            if reduce == Reduce::Mean && !members.is_empty() {
                let n = R::of(members.len() as f64);
                o.iter_mut().for_each(|o| *o = *o / n);
            }
        });
}

/// CPU twin of [`token_merge_backward`]: `dout [frames, R, inner]` -> `dx [frames, A, inner]`.
pub fn token_merge_backward_host<R: Real>(
    map: TokenMapView<'_>,
    dout: &[R],
    dx: &mut [R],
    frames: usize,
    inner: usize,
    reduce: Reduce,
) {
    let (atoms, tokens) = (map.atoms(), map.tokens);
    if inner == 0 || atoms == 0 {
        return;
    }
    debug_assert_eq!(dx.len(), frames * atoms * inner);
    dx.par_chunks_mut(inner)
        .with_min_len(rows_per_task(inner))
        .enumerate()
        .for_each(|(fa, d)| {
            let (f, a) = (fa / atoms, fa % atoms);
            let t = map.token_of_atom[a];
            if t < 0 {
                d.fill(R::of(0.0));
                return;
            }
            let t = t as usize;
            let g = &dout[(f * tokens + t) * inner..][..inner];
            match reduce {
                Reduce::Sum => d.copy_from_slice(g),
                Reduce::Mean => {
                    let n = R::of((map.row_ptr[t + 1] - map.row_ptr[t]) as f64);
                    for (d, &g) in d.iter_mut().zip(g) {
                        *d = g / n;
                    }
                }
            }
        });
}

/// (frames, count, inner) of features `[n, H]`, `[F, n, H]` or `[F, n, C, H]` (inner = C H),
/// and the position of the n dimension.
fn feature_dims(shape: &[usize]) -> Option<(usize, usize, usize, usize)> {
    match *shape {
        [n, h] => Some((1, n, h, 0)),
        [f, n, h] => Some((f, n, h, 1)),
        [f, n, c, h] => Some((f, n, c * h, 1)),
        _ => None,
    }
}

/// Shape of the token features `token_merge_forward` makes from atom features of shape
/// `x_shape`: the atom dimension replaced by the map's tokens. An error names a shape that is not
/// `[A, H]`, `[F, A, H]` or `[F, A, C, H]` with the map's A.
pub fn token_merge_output_shape(map: &DeviceTokenMap, x_shape: &[usize]) -> Result<Vec<usize>> {
    merged_shape("token_merge", "x", map.atoms(), map.tokens(), x_shape)
}

/// `from_shape` (with `from` in its atom or token dimension) with that dimension set to `to`.
fn merged_shape(
    op: &str,
    name: &str,
    from: usize,
    to: usize,
    from_shape: &[usize],
) -> Result<Vec<usize>> {
    let Some((_, n, _, pos)) = feature_dims(from_shape) else {
        bail!("{op}: {name} has shape {from_shape:?}, expected [n, H], [F, n, H] or [F, n, C, H]");
    };
    ensure!(
        n == from,
        "{op}: {name} has shape {from_shape:?}: {n} in its atom/token dimension, the map has {from}"
    );
    let mut s = from_shape.to_vec();
    s[pos] = to;
    Ok(s)
}

/// Checks atom features `a` and token features `t` (named for errors) against the map; returns
/// (frames, inner).
fn merge_dims(
    op: &str,
    map: &DeviceTokenMap,
    (a_name, a): (&str, &Tensor<f32>),
    (t_name, t): (&str, &Tensor<f32>),
) -> Result<(usize, usize)> {
    let want = merged_shape(op, a_name, map.atoms(), map.tokens(), a.shape())?;
    ensure!(
        t.shape() == want.as_slice(),
        "{op}: {t_name} has shape {:?}, expected {want:?} ({a_name} {:?} with the atoms merged \
         into {} tokens)",
        t.shape(),
        a.shape(),
        map.tokens()
    );
    let (frames, _, inner, _) = feature_dims(a.shape()).unwrap();
    fits_i32(op, "channels per atom", inner)?;
    Ok((frames, inner))
}

/// TMM step a: `out[f, r, :] = sum (or mean) over the atoms a of token r of x[f, a, :]`. `x` is
/// `[A, H]`, `[F, A, H]` or `[F, A, C, H]` (vectors: each xyz component merges by itself, so
/// rotating every atom's vectors rotates the tokens'); `out` is the same with A replaced by the
/// map's R ([`token_merge_output_shape`]). Atoms left out of the map are ignored; a token without
/// atoms gets 0. Assigns `out`.
pub fn token_merge_forward(
    map: &DeviceTokenMap,
    x: &Tensor<f32>,
    out: &mut Tensor<f32>,
    reduce: Reduce,
) -> Result<()> {
    let op = "token_merge_forward";
    let dev = same_device(op, map.device(), &[x.device(), out.device()])?;
    let (frames, inner) = merge_dims(op, map, ("x", x), ("out", out))?;
    let total = out.len();
    if total == 0 {
        return Ok(());
    }
    match dev {
        Device::Cpu => {
            token_merge_forward_host(
                map.host_view().unwrap(),
                x.host().unwrap(),
                out.host_mut().unwrap(),
                frames,
                inner,
                reduce,
            );
            Ok(())
        }
        _ => launch(
            dev,
            &k::TOKEN_MERGE_FORWARD,
            LaunchConfig::for_elements(total, THREADS),
            KernelArgs::new()
                .input(&map.row_ptr)
                .input(&map.atom_idx)
                .input(x)
                .output(out)
                .i64(total as i64)
                .i32(map.tokens as i32)
                .i32(map.atoms as i32)
                .i32(inner as i32)
                .i32(reduce.flag()),
        ),
    }
}

/// Backward of [`token_merge_forward`]: `dx[f, a, :] = dout[f, token(a), :]`, divided by the
/// token's atom count for [`Reduce::Mean`]; 0 for atoms left out of the map. ASSIGNS `dx` (an
/// activation gradient). Each atom reads one token: a plain gather.
pub fn token_merge_backward(
    map: &DeviceTokenMap,
    dout: &Tensor<f32>,
    dx: &mut Tensor<f32>,
    reduce: Reduce,
) -> Result<()> {
    let op = "token_merge_backward";
    let dev = same_device(op, map.device(), &[dout.device(), dx.device()])?;
    let (frames, inner) = merge_dims(op, map, ("dx", dx), ("dout", dout))?;
    let total = dx.len();
    if total == 0 {
        return Ok(());
    }
    match dev {
        Device::Cpu => {
            token_merge_backward_host(
                map.host_view().unwrap(),
                dout.host().unwrap(),
                dx.host_mut().unwrap(),
                frames,
                inner,
                reduce,
            );
            Ok(())
        }
        _ => launch(
            dev,
            &k::TOKEN_MERGE_BACKWARD,
            LaunchConfig::for_elements(total, THREADS),
            KernelArgs::new()
                .input(&map.row_ptr)
                .input(&map.token_of_atom)
                .input(dout)
                .output(dx)
                .i64(total as i64)
                .i32(map.tokens as i32)
                .i32(map.atoms as i32)
                .i32(inner as i32)
                .i32(reduce.flag()),
        ),
    }
}
