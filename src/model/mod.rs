//! Models: the stages of the pipeline assembled from [`crate::nn`] layers.

pub mod token;

pub use token::{
    token_labels, AttentionMap, Pooling, TokenBatch, TokenModel, TokenModelConfig, TokenOutput,
};
