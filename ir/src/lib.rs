//! kiln-ir: the typed IR of kiln.
//!
//! Values carry symbolic shapes (`f32[B, T, d]`); each op has one shape rule
//! ([`Op::infer`]); the [`verify()`] checks a whole graph; [`print_graph`] and
//! [`parse_module`] are the text IR, which round-trips exactly.

pub mod builder;
pub mod dim;
pub mod dot;
pub mod files;
pub mod graph;
pub mod op;
pub mod parse;
pub mod print;
pub mod shape;
pub mod tensor;
pub mod trace;
pub mod types;
pub mod verify;

pub use builder::GraphBuilder;
pub use dim::{Dim, DimError};
pub use graph::{Graph, InputRole, Module, Node, NodeKind, Span, ValueId};
pub use op::{AttrValue, BinaryOp, KernelOp, Op, ReduceKind, RelativeBias, UnaryOp, WeightLayout};
pub use parse::{parse_dim, parse_graph, parse_module, parse_type, ParseError};
pub use print::{print_graph, print_module, Namer};
pub use shape::{ShapeCx, ShapeError};
pub use tensor::{Element, Tensor, TensorData, TensorError, Weights};
pub use types::{DType, TensorType};
pub use verify::{verify, verify_module, Diagnostic, VerifyErrors};

/// Everything that can go wrong in kiln-ir.
#[derive(Debug, thiserror::Error)]
pub enum IrError {
    /// Text IR that is not well-formed.
    #[error("{0}")]
    Parse(#[from] ParseError),
    /// A graph that breaks one or more shape contracts.
    #[error("{0}")]
    Verify(#[from] VerifyErrors),
    /// An op rejected by its shape rule while building.
    #[error("{node}: {source}")]
    Shape {
        /// The node as it would print, e.g. `%new = matmul(%3, @w)`.
        node: String,
        /// What the shape rule found.
        #[source]
        source: Box<ShapeError>,
    },
    /// Misuse of the builder API (unknown value, duplicate name).
    #[error("{0}")]
    Build(String),
}

impl IrError {
    /// Whether this is a contract (shape) violation rather than malformed input.
    pub fn is_contract_violation(&self) -> bool {
        matches!(self, IrError::Verify(_) | IrError::Shape { .. })
    }
}
