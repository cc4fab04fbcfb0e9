//! The token model (SPEC step 3b-4): residue tokens in, one output vector per frame out.
//!
//! ```text
//! (s, v) residue tokens [B, R, Hin], [B, R, 3, Hin]
//!   -> EquiLinear(Hin -> H)
//!   -> residue graph convolution on C-alpha positions (optional; cheap or gated)
//!   -> window merger (w residues per token: R -> ceil(R / w))
//!   -> sinusoidal position encoding on s
//!   -> N x [ x += EqSDPA(EqLN(x)); x += EqFFN(EqLN(x)) ]
//!   -> pool over tokens (mean or first) -> Linear + SiLU -> Linear -> [B, out]
//! ```
//!
//! Configured from TOML ([`TokenModelConfig`]); initialised from a seed, so the same
//! configuration and seed give the same parameters on every device.

use crate::nn::layers::{
    AttentionKind, AttentionRecord, BlockShape, EqBlock, EquiLinear, GraphConvKind, Linear,
    ResidueGraphConv, WindowMerger,
};
use crate::nn::{self, tokens};
use crate::ops::graph_conv::{edge_rbf_forward, ResidueGraph};
use crate::ops::tokens::{merged_token_mask, padded_tokens, Pool};
use crate::tape::{ParamStore, Tape, Var};
use crate::tensor::Tensor;
use crate::Device;
use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Pooling over tokens, as written in TOML.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// Mean over the (unpadded) tokens.
    Mean,
    /// The first token.
    First,
}

/// The token model's shape, read from TOML. Every field but `input_channels` has a default.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenModelConfig {
    /// Channels of the residue tokens coming in (the atom stage's H).
    pub input_channels: usize,
    /// Channels inside the model (H).
    pub hidden: usize,
    /// Attention heads (H must be a multiple; H / heads must be 8, 16, 32 or 64 for the fused
    /// kernel).
    pub heads: usize,
    /// Attention weights by the fused kernel ("fused", the default) or materialised.
    pub attention: AttentionKind,
    /// Transformer blocks (N).
    pub blocks: usize,
    /// Residues merged per token (w).
    pub window: usize,
    /// Residue graph convolution before merging: none, "cheap" or "gated".
    pub graph_conv: Option<GraphConvKind>,
    /// Its C-alpha radius in Angstrom.
    pub graph_cutoff: f32,
    /// Radial basis functions of the gated convolution.
    pub graph_rbf: usize,
    /// Pooling over tokens.
    pub pooling: Pooling,
    /// Dropout probability on every branch of every block.
    pub dropout: f32,
    /// Hidden width of each block's EqFFN (default: H).
    pub ffn_hidden: Option<usize>,
    /// Hidden width of the output MLP (default: H).
    pub mlp_hidden: Option<usize>,
    /// Width of the output (e.g. the number of VAMP states).
    pub output: usize,
    /// Layer-norm epsilon.
    pub eps: f32,
    /// Seed of the initialisation.
    pub seed: u64,
    /// Training keeps only each block's inputs and outputs and runs the block again in the
    /// backward pass (activation checkpointing, [`Tape::checkpoint`]): a step's activation
    /// memory drops to about a third for one more forward pass of the blocks. With windows
    /// (w > 1) the stem (embedding, graph convolution, merging) is recomputed too, in chunks
    /// of [`STEM_CHUNK`] frames ([`Tape::checkpoint_frames`]), so its per-residue activations
    /// never exist for the whole batch. Evaluation is unaffected (nothing is recomputed
    /// without a backward pass). On by default.
    pub checkpoint: bool,
}

impl Default for TokenModelConfig {
    fn default() -> Self {
        Self {
            input_channels: 64,
            hidden: 64,
            heads: 4,
            attention: AttentionKind::Fused,
            blocks: 2,
            window: 1,
            graph_conv: None,
            graph_cutoff: 8.0,
            graph_rbf: 16,
            pooling: Pooling::Mean,
            dropout: 0.0,
            ffn_hidden: None,
            mlp_hidden: None,
            output: 4,
            eps: 1e-5,
            seed: 0,
            checkpoint: true,
        }
    }
}

impl TokenModelConfig {
    /// Parses TOML text (unknown keys are errors).
    pub fn from_toml(text: &str) -> Result<Self> {
        let c: Self = toml::from_str(text).context("token model configuration")?;
        c.validate()?;
        Ok(c)
    }

    /// Reads a TOML file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_toml(&text).with_context(|| format!("in {}", path.display()))
    }

    /// Checks sizes and probabilities; the error names the field.
    pub fn validate(&self) -> Result<()> {
        ensure!(self.input_channels > 0, "input_channels must be positive");
        ensure!(self.hidden > 0, "hidden must be positive");
        ensure!(
            self.heads > 0 && self.hidden.is_multiple_of(self.heads),
            "heads = {} must divide hidden = {}",
            self.heads,
            self.hidden
        );
        ensure!(self.window > 0, "window must be at least 1");
        if self.attention == AttentionKind::Fused {
            let dh = self.hidden / self.heads;
            ensure!(
                matches!(dh, 8 | 16 | 32 | 64),
                "hidden / heads = {dh}: the fused attention kernel takes head widths 8, 16, 32 \
                 or 64 (set attention = \"materialised\" for other widths)"
            );
        }
        ensure!(self.output > 0, "output must be positive");
        ensure!(
            (0.0..1.0).contains(&self.dropout),
            "dropout = {} must be in [0, 1)",
            self.dropout
        );
        ensure!(
            self.graph_cutoff > 0.0 && self.graph_cutoff.is_finite(),
            "graph_cutoff = {} must be a positive distance in Angstrom",
            self.graph_cutoff
        );
        ensure!(self.graph_rbf > 0, "graph_rbf must be positive");
        ensure!(self.eps > 0.0, "eps must be positive");
        Ok(())
    }
}

/// Frames per chunk of the checkpointed stem in training ([`Tape::checkpoint_frames`]): at
/// 214 residues, 32 frames of embedded and merged features and their gradients are ~30 MB,
/// and the stem's GEMMs still have thousands of rows.
pub const STEM_CHUNK: usize = 32;

/// One batch of frames as residue tokens.
pub struct TokenBatch {
    /// Scalar features `[B, R, Hin]`. Shared: on the tape's device the model reads them in place
    /// ([`Tape::input_shared`]), without a copy.
    pub s: Arc<Tensor<f32>>,
    /// Vector features `[B, R, 3, Hin]` (shared, as `s`).
    pub v: Arc<Tensor<f32>>,
    /// C-alpha positions `[B, R, 3]` in Angstrom (host), for the graph convolution.
    pub ca: Option<Vec<f32>>,
    /// Valid residues `[B, R]` (1) and padding (0), when frames of different sizes share a batch.
    pub mask: Option<Vec<u8>>,
}

/// What [`TokenModel::forward`] leaves on the tape.
#[derive(Clone, Debug)]
pub struct TokenOutput {
    /// The model output `[B, out]`.
    pub out: Var,
    /// Final token scalars `[B, T', H]`.
    pub s: Var,
    /// Final token vectors `[B, T', 3, H]`.
    pub v: Var,
    /// Each block's attention queries and keys, for [`TokenModel::attention_maps`].
    pub attention: Vec<AttentionRecord>,
    /// The merged tokens' padding mask `[B, T']`, if the batch had one.
    pub mask: Option<Arc<Tensor<u8>>>,
}

/// Attention probabilities of one block, averaged over the frames asked for.
#[derive(Clone, Debug)]
pub struct AttentionMap {
    /// Block index.
    pub block: usize,
    /// Tokens per frame (T'): maps are T' x T', row = query, column = key.
    pub tokens: usize,
    /// Heads.
    pub heads: usize,
    /// Per-head maps `[heads, T', T']`, row-major.
    pub per_head: Vec<f32>,
    /// The head average `[T', T']`.
    pub mean: Vec<f32>,
    /// Frames averaged.
    pub frames: usize,
}

impl AttentionMap {
    /// Writes the map into `dir`: `attention_block{b}.npy` (`[heads, T', T']`),
    /// `attention_block{b}_mean.npy` (`[T', T']`), and heat maps `attention_block{b}_mean.svg`
    /// and `attention_block{b}_head{h}.svg` with `token_labels` (one per token, e.g. from
    /// [`token_labels`]) on the axes: rows are queries, columns keys. Returns the files written.
    pub fn save(&self, dir: impl AsRef<Path>, token_labels: &[String]) -> Result<Vec<PathBuf>> {
        let dir = dir.as_ref();
        let t = self.tokens;
        ensure!(
            token_labels.len() == t,
            "attention map of block {}: {} token labels for {t} tokens",
            self.block,
            token_labels.len()
        );
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create", dir.display()))?;
        let b = self.block;
        let mut written = Vec::new();
        let p = dir.join(format!("attention_block{b}.npy"));
        crate::npy::write_f32(&p, &[self.heads, t, t], &self.per_head)?;
        written.push(p);
        let p = dir.join(format!("attention_block{b}_mean.npy"));
        crate::npy::write_f32(&p, &[t, t], &self.mean)?;
        written.push(p);
        let picture = |data: &[f32], title: String, path: PathBuf| -> Result<PathBuf> {
            crate::plot::Heatmap::new(t, t, data)
                .title(title)
                .x_label("key (residue)")
                .y_label("query (residue)")
                .value_label("attention probability")
                .x_labels(token_labels.to_vec())
                .y_labels(token_labels.to_vec())
                .save_svg(&path)?;
            Ok(path)
        };
        written.push(picture(
            &self.mean,
            format!(
                "block {b}: attention averaged over {} heads and {} frames",
                self.heads, self.frames
            ),
            dir.join(format!("attention_block{b}_mean.svg")),
        )?);
        for h in 0..self.heads {
            written.push(picture(
                &self.per_head[h * t * t..(h + 1) * t * t],
                format!(
                    "block {b}, head {h}: attention averaged over {} frames",
                    self.frames
                ),
                dir.join(format!("attention_block{b}_head{h}.svg")),
            )?);
        }
        Ok(written)
    }
}

/// Axis labels of merged tokens: the residue numbers each token covers (`"17"` for w = 1,
/// `"17-20"` for a window of four), from the residue number of every residue token.
pub fn token_labels(residue_numbers: &[i32], window: usize) -> Vec<String> {
    residue_numbers
        .chunks(window.max(1))
        .map(|c| match (c.first(), c.last()) {
            (Some(a), Some(z)) if a != z => format!("{a}-{z}"),
            (Some(a), _) => a.to_string(),
            _ => String::new(),
        })
        .collect()
}

/// The token model's layers (its parameters live in the tape's [`ParamStore`]).
pub struct TokenModel {
    config: TokenModelConfig,
    embed: EquiLinear,
    graph: Option<ResidueGraphConv>,
    merger: Option<WindowMerger>,
    blocks: Vec<EqBlock>,
    mlp: Linear,
    head: Linear,
}

impl TokenModel {
    /// Creates the layers, adding their parameters to `ps` in a fixed order.
    pub fn new(config: TokenModelConfig, ps: &mut ParamStore) -> Result<Self> {
        config.validate()?;
        let c = &config;
        let h = c.hidden;
        let embed = EquiLinear::new(ps, "embed", c.input_channels, h)?;
        let graph = c
            .graph_conv
            .map(|k| ResidueGraphConv::new(ps, "graph_conv", h, k, c.graph_rbf))
            .transpose()?;
        let merger = (c.window > 1)
            .then(|| WindowMerger::new(ps, "merge", h, c.window))
            .transpose()?;
        let shape = BlockShape {
            hidden: h,
            heads: c.heads,
            ffn_hidden: c.ffn_hidden.unwrap_or(h),
            dropout: c.dropout,
            eps: c.eps,
            attention: c.attention,
        };
        let blocks = (0..c.blocks)
            .map(|i| EqBlock::new(ps, &format!("block{i}"), &shape))
            .collect::<Result<_>>()?;
        let mh = c.mlp_hidden.unwrap_or(h);
        let mlp = Linear::new(ps, "mlp", h, mh, true)?;
        let head = Linear::new(ps, "out", mh, c.output, true)?;
        Ok(Self {
            config,
            embed,
            graph,
            merger,
            blocks,
            mlp,
            head,
        })
    }

    /// A fresh parameter store on `device` with this model's parameters, and the model.
    pub fn create(config: TokenModelConfig, device: &Device) -> Result<(Self, ParamStore)> {
        let mut ps = ParamStore::new(device, config.seed);
        let m = Self::new(config, &mut ps)?;
        Ok((m, ps))
    }

    /// The configuration.
    pub fn config(&self) -> &TokenModelConfig {
        &self.config
    }

    /// Tokens after merging `residues` residues.
    pub fn tokens(&self, residues: usize) -> usize {
        padded_tokens(residues, self.config.window)
    }

    /// Runs the model on a batch, recording on `tape`. The input features need no gradient
    /// unless recorded with [`Tape::input_with_grad`] by [`TokenModel::forward_vars`].
    pub fn forward(&self, tape: &mut Tape, batch: &TokenBatch) -> Result<TokenOutput> {
        let s = record_input(tape, &batch.s)?;
        let v = record_input(tape, &batch.v)?;
        self.forward_vars(tape, s, v, batch.ca.as_deref(), batch.mask.as_deref())
    }

    /// As [`TokenModel::forward`] from token features already on the tape.
    pub fn forward_vars(
        &self,
        tape: &mut Tape,
        s: Var,
        v: Var,
        ca: Option<&[f32]>,
        mask: Option<&[u8]>,
    ) -> Result<TokenOutput> {
        let c = &self.config;
        let (b, r, cs, hin) = tokens::dims(tape, s)?;
        ensure!(
            cs == 1 && hin == c.input_channels,
            "token model: scalar tokens are {:?}, expected [B, R, {}]",
            tape.shape(s),
            c.input_channels
        );
        ensure!(
            tape.shape(v) == [b, r, 3, hin],
            "token model: vector tokens are {:?}, expected [{b}, {r}, 3, {hin}]",
            tape.shape(v)
        );
        if let Some(m) = mask {
            ensure!(
                m.len() == b * r,
                "token model: the mask has {} entries for {b} frames of {r} residues",
                m.len()
            );
        }
        if self.graph.is_some() {
            let Some(ca) = ca else {
                anyhow::bail!("token model: the residue graph convolution needs C-alpha positions");
            };
            ensure!(
                ca.len() == b * r * 3,
                "token model: {} C-alpha coordinates for {b} frames of {r} residues",
                ca.len()
            );
        }
        // The stem: embedding, graph convolution, window merging, frame by frame. Per residue
        // it holds the largest activations of the model (w times those of the merged tokens),
        // so training keeps only its merged outputs and recomputes it in the backward pass,
        // STEM_CHUNK frames at a time: its intermediate values exist for one chunk at once.
        let stem = {
            let (embed, conv, merger) =
                (self.embed.clone(), self.graph.clone(), self.merger.clone());
            let (rbf_k, cutoff) = (c.graph_rbf, c.graph_cutoff);
            let gated = matches!(c.graph_conv, Some(GraphConvKind::Gated));
            let ca = conv.as_ref().and(ca).map(<[f32]>::to_vec);
            let mask = mask.map(<[u8]>::to_vec);
            move |tape: &mut Tape, x: &[Var], frames: Range<usize>| -> Result<Vec<Var>> {
                let nb = frames.len();
                let dev = tape.device().clone();
                let mask = mask.as_ref().map(|m| &m[frames.start * r..frames.end * r]);
                let (mut s, mut v) = embed.forward(tape, x[0], x[1])?;
                if let (Some(conv), Some(ca)) = (&conv, &ca) {
                    let ca = &ca[frames.start * r * 3..frames.end * r * 3];
                    let g = ResidueGraph::build(ca, nb, r, mask, cutoff)?;
                    let dg = Arc::new(g.to_device(&dev)?);
                    let rbf = if gated {
                        let mut e = tape.alloc(&[dg.edges(), rbf_k])?;
                        edge_rbf_forward(dg.dist(), &mut e, cutoff, rbf_k)?;
                        Some(tape.input(e)?)
                    } else {
                        None
                    };
                    (s, v) = conv.forward(tape, s, v, &dg, rbf)?;
                }
                if let Some(merger) = &merger {
                    // Padding residues hold embedding (and graph-root) biases of whatever their
                    // inputs were: zero them so that a window mixing real and padding residues
                    // sees only the real ones, and a frame's output does not depend on how far
                    // it was padded.
                    if let Some(m) = mask {
                        let m = Arc::new(Tensor::from_slice(&dev, &[nb, r], m)?);
                        s = tokens::token_mask(tape, s, m.clone())?;
                        v = tokens::token_mask(tape, v, m)?;
                    }
                    (s, v) = merger.forward(tape, s, v)?;
                }
                Ok(vec![s, v])
            }
        };
        let checkpoint_stem = c.checkpoint && tape.training() && self.merger.is_some();
        let out = if checkpoint_stem {
            tape.checkpoint_frames("stem", &[s, v], STEM_CHUNK, stem)?
        } else {
            stem(tape, &[s, v], 0..b)?
        };
        let (mut s, mut v) = (out[0], out[1]);
        let mut token_mask = mask.map(<[u8]>::to_vec);
        if let Some(merger) = &self.merger {
            token_mask = token_mask.map(|m| merged_token_mask(&m, r, merger.w));
        }
        let t = self.tokens(r);
        let dev = tape.device().clone();
        let mask_t = token_mask
            .map(|m| Tensor::from_slice(&dev, &[b, t], &m).map(Arc::new))
            .transpose()?;
        s = tokens::position_encoding(tape, s)?;
        let mut attention = Vec::with_capacity(self.blocks.len());
        // Checkpointed blocks exist on the tape only as inputs and outputs, so their attention
        // records (queries and keys for attention maps) are not kept: maps come from evaluation
        // passes, which do not checkpoint.
        let checkpoint = c.checkpoint && tape.training();
        for block in &self.blocks {
            if checkpoint {
                let (b, m) = (block.clone(), mask_t.clone());
                let out = tape.checkpoint("eq_block", &[s, v], move |t, x| {
                    let ((s, v), _) = b.forward(t, x[0], x[1], m.clone())?;
                    Ok(vec![s, v])
                })?;
                (s, v) = (out[0], out[1]);
            } else {
                let rec;
                ((s, v), rec) = block.forward(tape, s, v, mask_t.clone())?;
                attention.push(rec);
            }
        }
        let kind = match c.pooling {
            Pooling::Mean => Pool::Mean,
            Pooling::First => Pool::First,
        };
        let pooled = tokens::pool(tape, s, mask_t.clone(), kind)?;
        let hdn = self.mlp.forward(tape, pooled)?;
        let hdn = nn::silu(tape, hdn)?;
        let out = self.head.forward(tape, hdn)?;
        Ok(TokenOutput {
            out,
            s,
            v,
            attention,
            mask: mask_t,
        })
    }

    /// Attention maps of every block from a forward pass's queries and keys: the softmax
    /// probabilities (padding keys at 0) per head and averaged over heads, averaged over
    /// `frames` of the batch (all frames when None). Computed one frame at a time, so the
    /// memory is one frame's `heads x T' x T'` whatever the attention kernel.
    pub fn attention_maps(
        &self,
        tape: &Tape,
        out: &TokenOutput,
        frames: Option<&[usize]>,
    ) -> Result<Vec<AttentionMap>> {
        ensure!(
            out.attention.len() == self.blocks.len(),
            "attention maps: the forward pass kept the records of {} of {} blocks (training \
             passes checkpoint their blocks and keep none: run it with tape.set_training(false))",
            out.attention.len(),
            self.blocks.len()
        );
        let dev = tape.device().clone();
        let mask_all = out.mask.as_ref().map(|m| m.to_vec()).transpose()?;
        let mut maps = Vec::with_capacity(out.attention.len());
        for (block, rec) in out.attention.iter().enumerate() {
            let &[b, nh, t, dh] = tape.shape(rec.q) else {
                anyhow::bail!(
                    "attention maps: queries of block {block} are {:?}",
                    tape.shape(rec.q)
                );
            };
            let all: Vec<usize> = (0..b).collect();
            let frames = frames.unwrap_or(&all);
            ensure!(!frames.is_empty(), "attention maps: no frame chosen");
            let q_all = tape.value(rec.q).to_vec()?;
            let k_all = tape.value(rec.k).to_vec()?;
            let mut acc = vec![0.0f64; nh * t * t];
            for &f in frames {
                ensure!(f < b, "attention maps: frame {f} is not in a batch of {b}");
                let span = nh * t * dh;
                let q = Tensor::from_slice(&dev, &[nh, t, dh], &q_all[f * span..(f + 1) * span])?;
                let k = Tensor::from_slice(&dev, &[nh, t, dh], &k_all[f * span..(f + 1) * span])?;
                let mut scores = Tensor::zeros(&dev, &[nh, t, t])?;
                crate::ops::gemm::gemm_batched(
                    false,
                    true,
                    t,
                    t,
                    dh,
                    1.0,
                    &q,
                    &k,
                    0.0,
                    &mut scores,
                    crate::ops::gemm::Batch::packed(nh, t, t, dh),
                )?;
                let mask = mask_all
                    .as_ref()
                    .map(|m| Tensor::from_slice(&dev, &[1, t], &m[f * t..(f + 1) * t]))
                    .transpose()?;
                let mut p = Tensor::zeros(&dev, &[nh, t, t])?;
                crate::ops::softmax::softmax_forward(
                    &scores,
                    &mut p,
                    1.0 / (dh as f32).sqrt(),
                    mask.as_ref(),
                    nh * t,
                )?;
                for (a, x) in acc.iter_mut().zip(p.to_vec()?) {
                    *a += x as f64;
                }
            }
            let n = frames.len() as f64;
            let per_head: Vec<f32> = acc.iter().map(|&x| (x / n) as f32).collect();
            let mean: Vec<f32> = (0..t * t)
                .map(|i| {
                    ((0..nh).map(|h| acc[h * t * t + i]).sum::<f64>() / (n * nh as f64)) as f32
                })
                .collect();
            maps.push(AttentionMap {
                block,
                tokens: t,
                heads: nh,
                per_head,
                mean,
                frames: frames.len(),
            });
        }
        Ok(maps)
    }
}

/// `t` as a tape input: read in place on the tape's device, else copied there.
fn record_input(tape: &mut Tape, t: &Arc<Tensor<f32>>) -> Result<Var> {
    if t.device().same(tape.device()) {
        tape.input_shared(t)
    } else {
        let c = t.to_device(tape.device())?;
        tape.input(c)
    }
}
