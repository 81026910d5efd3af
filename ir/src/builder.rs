//! `GraphBuilder`: builds a graph in Rust, checking each op's shape rule as it is
//! added, so a contract violation is reported at the line that made it.

use crate::dim::Dim;
use crate::graph::{Graph, ValueId};
use crate::op::{BinaryOp, Op, UnaryOp};
use crate::print::Namer;
use crate::shape::ShapeCx;
use crate::types::TensorType;
use crate::verify::verify;
use crate::IrError;

/// Builds one function op by op, inferring every result type.
pub struct GraphBuilder {
    graph: Graph,
    cx: ShapeCx,
}

impl GraphBuilder {
    /// Starts a function called `name`.
    pub fn new(name: &str) -> GraphBuilder {
        GraphBuilder {
            graph: Graph::new(name),
            cx: ShapeCx::new(),
        }
    }

    /// Binds a compile-time symbol, e.g. `d = 768` or `dh = d / h`; returns its value.
    pub fn bind(&mut self, name: &str, value: impl Into<Dim>) -> Result<Dim, IrError> {
        let value = value.into();
        if self.graph.bindings().iter().any(|(n, _)| n == name) {
            return Err(IrError::Build(format!("symbol `{name}` is bound twice")));
        }
        let v = self
            .cx
            .bind(name, &value)
            .map_err(|source| IrError::Shape {
                node: format!("where {name} = {value}"),
                source: Box::new(source),
            })?;
        self.graph.bind(name, value);
        Ok(v)
    }

    /// Adds an input.
    pub fn input(&mut self, name: &str, ty: TensorType) -> ValueId {
        self.graph.add_input(name, ty)
    }

    /// Declares a parameter (weight).
    pub fn param(&mut self, name: &str, ty: TensorType) -> ValueId {
        self.graph.add_param(name, ty)
    }

    /// The type of a value built so far.
    pub fn ty(&self, v: ValueId) -> &TensorType {
        self.graph.ty(v)
    }

    /// The symbol context (bindings) built so far.
    pub fn cx(&self) -> &ShapeCx {
        &self.cx
    }

    /// Adds `op(operands)`, inferring its type; a violated contract is an error
    /// naming the node.
    pub fn op(&mut self, op: Op, operands: &[ValueId]) -> Result<ValueId, IrError> {
        self.add(op, operands, None)
    }

    /// Like [`GraphBuilder::op`], with a value name printed as `%name`.
    pub fn named(&mut self, name: &str, op: Op, operands: &[ValueId]) -> Result<ValueId, IrError> {
        self.add(op, operands, Some(name.to_string()))
    }

    fn add(
        &mut self,
        op: Op,
        operands: &[ValueId],
        name: Option<String>,
    ) -> Result<ValueId, IrError> {
        if let Some(bad) = operands.iter().find(|v| !self.graph.contains(**v)) {
            return Err(IrError::Build(format!(
                "{}: operand #{} is not a value of this graph",
                op.name(),
                bad.index()
            )));
        }
        let types: Vec<TensorType> = operands.iter().map(|v| self.graph.ty(*v).clone()).collect();
        match op.infer(&types, &self.cx) {
            Ok(ty) => Ok(self.graph.add_op(op, operands, ty, name)),
            Err(source) => {
                let namer = Namer::new(&self.graph);
                let args: Vec<&str> = operands.iter().map(|v| namer.name(*v)).collect();
                let lhs = name.map_or_else(|| "%new".to_string(), |n| format!("%{n}"));
                Err(IrError::Shape {
                    node: format!("{lhs} = {}({})", op.name(), args.join(", ")),
                    source: Box::new(source),
                })
            }
        }
    }

    /// `unary(x)`.
    pub fn unary(&mut self, u: UnaryOp, x: ValueId) -> Result<ValueId, IrError> {
        self.op(Op::Unary(u), &[x])
    }

    /// `binary(a, b)` with broadcasting.
    pub fn binary(&mut self, b: BinaryOp, x: ValueId, y: ValueId) -> Result<ValueId, IrError> {
        self.op(Op::Binary(b), &[x, y])
    }

    /// `a + b`.
    pub fn add_(&mut self, x: ValueId, y: ValueId) -> Result<ValueId, IrError> {
        self.binary(BinaryOp::Add, x, y)
    }

    /// `a * b`.
    pub fn mul(&mut self, x: ValueId, y: ValueId) -> Result<ValueId, IrError> {
        self.binary(BinaryOp::Mul, x, y)
    }

    /// `a · b`.
    pub fn matmul(&mut self, x: ValueId, y: ValueId) -> Result<ValueId, IrError> {
        self.op(
            Op::MatMul {
                transpose_a: false,
                transpose_b: false,
            },
            &[x, y],
        )
    }

    /// A scalar constant of `x`'s dtype.
    pub fn scalar(&mut self, value: f64, like: ValueId) -> Result<ValueId, IrError> {
        let dtype = self.graph.ty(like).dtype;
        self.op(
            Op::Constant {
                value,
                dtype,
                shape: vec![],
            },
            &[],
        )
    }

    /// `reshape(x)` to `shape`.
    pub fn reshape(&mut self, x: ValueId, shape: Vec<Dim>) -> Result<ValueId, IrError> {
        self.op(Op::Reshape { shape }, &[x])
    }

    /// `permute(x)` by `perm`.
    pub fn permute(&mut self, x: ValueId, perm: &[usize]) -> Result<ValueId, IrError> {
        self.op(
            Op::Permute {
                perm: perm.to_vec(),
            },
            &[x],
        )
    }

    /// Finishes the function with named outputs and verifies it whole.
    pub fn finish(mut self, outputs: &[(&str, ValueId)]) -> Result<Graph, IrError> {
        self.graph
            .set_outputs(outputs.iter().map(|(n, v)| (n.to_string(), *v)).collect());
        verify(&self.graph)?;
        Ok(self.graph)
    }
}
