//! What a rank holds or needs: named tensors and this rank's share of each,
//! and the typed errors of a description that cannot be planned.

/// This rank's part of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Share {
    /// The whole tensor.
    Replicated,
    /// Indices `start..end` of dimension `dim` (every index of the other
    /// dimensions): an FSDP dim-0 shard, a TP column or row split, or any
    /// uneven range. An empty range holds nothing.
    Split {
        /// The split dimension.
        dim: u8,
        /// First index held.
        start: u64,
        /// One past the last index held.
        end: u64,
    },
}

/// The most dimensions a tensor may have.
pub const MAX_DIMS: usize = 8;

/// The longest tensor name, in bytes.
pub const MAX_NAME: usize = 1024;

/// One named tensor as a rank holds (source) or needs (destination) it:
/// its element size, its full shape and this rank's share. The share's
/// bytes are laid out row-major (C order) over the share's own shape, as
/// a contiguous PyTorch tensor of that shape is.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TensorSpec {
    /// Unique on each rank; the two sides match tensors by it.
    pub name: String,
    /// Bytes per element (bf16: 2, fp8: 1); both sides must agree.
    pub elem_bytes: u32,
    /// The full tensor's shape (a scalar has `[]`).
    pub shape: Vec<u64>,
    /// What this rank holds of it.
    pub share: Share,
}

impl TensorSpec {
    /// The whole tensor.
    pub fn replicated(name: impl Into<String>, elem_bytes: u32, shape: &[u64]) -> Self {
        TensorSpec { name: name.into(), elem_bytes, shape: shape.to_vec(), share: Share::Replicated }
    }

    /// Indices `start..end` of dimension `dim`.
    pub fn split(name: impl Into<String>, elem_bytes: u32, shape: &[u64], dim: u8, start: u64, end: u64) -> Self {
        TensorSpec { name: name.into(), elem_bytes, shape: shape.to_vec(), share: Share::Split { dim, start, end } }
    }

    /// Part `rank` of `ranks` along `dim`, cut as `torch.chunk` cuts: parts
    /// of `ceil(n / ranks)` indices, the last ones shorter or empty.
    pub fn chunk(name: impl Into<String>, elem_bytes: u32, shape: &[u64], dim: u8, rank: u32, ranks: u32) -> Self {
        let n = shape.get(dim as usize).copied().unwrap_or(0);
        let per = n.div_ceil(u64::from(ranks.max(1)));
        let start = (per * u64::from(rank)).min(n);
        let end = (start + per).min(n);
        Self::split(name, elem_bytes, shape, dim, start, end)
    }

    /// The shape used for layout: a scalar is `[1]`.
    pub(crate) fn dims(&self) -> &[u64] {
        if self.shape.is_empty() {
            &[1]
        } else {
            &self.shape
        }
    }

    /// The share as `(dim, start, end)`; a replicated share is all of
    /// dimension 0.
    pub(crate) fn range(&self) -> (usize, u64, u64) {
        match self.share {
            Share::Replicated => (0, 0, self.dims()[0]),
            Share::Split { dim, start, end } => (dim as usize, start, end),
        }
    }

    /// The share's own shape.
    pub fn share_shape(&self) -> Vec<u64> {
        let (dim, start, end) = self.range();
        let mut s = self.dims().to_vec();
        s[dim] = end - start;
        s
    }

    /// Bytes of this rank's share.
    pub fn share_bytes(&self) -> u64 {
        let (dim, start, end) = self.range();
        let whole: u64 = self.dims().iter().enumerate().map(|(d, &n)| if d == dim { end - start } else { n }).product();
        whole * u64::from(self.elem_bytes)
    }

    /// Bytes of the whole tensor.
    pub fn full_bytes(&self) -> u64 {
        self.dims().iter().product::<u64>() * u64::from(self.elem_bytes)
    }

    /// Checks the spec on its own.
    pub fn validate(&self) -> Result<(), PlanError> {
        let bad = |reason: String| Err(PlanError::InvalidSpec { name: self.name.clone(), reason });
        if self.name.is_empty() || self.name.len() > MAX_NAME {
            return bad(format!("a name has 1 to {MAX_NAME} bytes"));
        }
        if self.elem_bytes == 0 || self.elem_bytes > 64 {
            return bad(format!("{} bytes per element (1 to 64)", self.elem_bytes));
        }
        if self.shape.len() > MAX_DIMS {
            return bad(format!("{} dimensions (at most {MAX_DIMS})", self.shape.len()));
        }
        let mut total = u64::from(self.elem_bytes);
        for &d in self.dims() {
            total = match total.checked_mul(d) {
                Some(t) if t < (1 << 60) => t,
                _ => return bad("its size overflows".into()),
            };
        }
        if let Share::Split { dim, start, end } = self.share {
            let Some(&n) = self.dims().get(dim as usize) else {
                return bad(format!("split along dimension {dim} of a {}-dimensional tensor", self.dims().len()));
            };
            if self.shape.is_empty() || start > end || end > n {
                return bad(format!("share {start}..{end} of dimension {dim} (size {n})"));
            }
        }
        Ok(())
    }
}

/// Which side of a transfer a rank is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Holds the new weights (a trainer rank).
    Source,
    /// Receives them into its parameter memory (an inference rank).
    Destination,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Source => "source",
            Role::Destination => "destination",
        })
    }
}

/// Why a set of descriptions cannot be planned. Every variant names the
/// tensor and the ranks concerned; nothing is transferred.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    /// A spec is malformed on its own.
    #[error("tensor {name:?}: {reason}")]
    InvalidSpec {
        /// The tensor.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A tensor is described on one side only.
    #[error("tensor {name:?} is described by {side} rank {rank} and by no {} rank", other(*side))]
    OneSided {
        /// The tensor.
        name: String,
        /// The side that has it.
        side: Role,
        /// A rank of that side that has it.
        rank: u32,
    },
    /// Two ranks disagree on a tensor's element size or shape.
    #[error("tensor {name:?}: {what} is {a} on {} rank {a_rank} but {b} on {} rank {b_rank}", a_side, b_side)]
    Mismatch {
        /// The tensor.
        name: String,
        /// `element size` or `shape`.
        what: &'static str,
        /// One rank's value.
        a: String,
        /// Its side.
        a_side: Role,
        /// The rank.
        a_rank: u32,
        /// The other rank's value.
        b: String,
        /// Its side.
        b_side: Role,
        /// The other rank.
        b_rank: u32,
    },
    /// Two ranks of one side hold parts of a tensor that overlap without
    /// being the same part (identical parts are replicas).
    #[error("tensor {name:?}: the shares of {side} ranks {a} and {b} overlap (only identical shares may)")]
    Overlap {
        /// The tensor.
        name: String,
        /// The side.
        side: Role,
        /// One rank.
        a: u32,
        /// The other.
        b: u32,
    },
    /// No source holds some bytes a destination needs.
    #[error("tensor {name:?}: {missing} bytes destination rank {dest} needs are held by no source")]
    Uncovered {
        /// The tensor.
        name: String,
        /// The destination.
        dest: u32,
        /// Bytes of its share no source holds.
        missing: u64,
    },
    /// A rank lists a tensor twice.
    #[error("tensor {name:?} is listed twice by {side} rank {rank}")]
    Duplicate {
        /// The tensor.
        name: String,
        /// The side.
        side: Role,
        /// The rank.
        rank: u32,
    },
    /// The group as a whole cannot be planned.
    #[error("{0}")]
    Group(String),
}

fn other(side: Role) -> Role {
    match side {
        Role::Source => Role::Destination,
        Role::Destination => Role::Source,
    }
}
