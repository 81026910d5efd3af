//! JSON output of tensors: nested arrays in shape order, floats printed with the
//! shortest text that reads back to the same f32.

use std::fmt::Write;

use kiln_backends::{Tensor, TensorData};

/// Writes `tensor` as nested JSON arrays (`null` for NaN and infinities, which
/// JSON cannot spell).
pub fn tensor_json(tensor: &Tensor) -> String {
    let mut s = String::new();
    let shape = tensor.shape();
    let mut index = 0usize;
    write_level(&mut s, tensor.data(), shape, &mut index);
    s
}

fn write_level(s: &mut String, data: &TensorData, shape: &[usize], index: &mut usize) {
    match shape.split_first() {
        None => {
            write_scalar(s, data, *index);
            *index += 1;
        }
        Some((&n, rest)) => {
            s.push('[');
            for i in 0..n {
                if i > 0 {
                    s.push(',');
                }
                write_level(s, data, rest, index);
            }
            s.push(']');
        }
    }
}

fn write_scalar(s: &mut String, data: &TensorData, i: usize) {
    let _ = match data {
        TensorData::F32(v) => match v.get(i) {
            Some(x) if x.is_finite() => write!(s, "{x}"),
            _ => write!(s, "null"),
        },
        TensorData::I32(v) => write!(s, "{}", v.get(i).copied().unwrap_or_default()),
        TensorData::I64(v) => write!(s, "{}", v.get(i).copied().unwrap_or_default()),
        TensorData::Bool(v) => write!(s, "{}", v.get(i).copied().unwrap_or_default()),
        TensorData::F16(v) => match v.get(i).map(|x| x.to_f32()) {
            Some(x) if x.is_finite() => write!(s, "{x}"),
            _ => write!(s, "null"),
        },
        TensorData::BF16(v) => match v.get(i).map(|x| x.to_f32()) {
            Some(x) if x.is_finite() => write!(s, "{x}"),
            _ => write!(s, "null"),
        },
    };
}

/// `{"name": tensor, ...}` for named outputs, in order.
pub fn outputs_json(outputs: &[(String, Tensor)]) -> String {
    let parts: Vec<String> = outputs
        .iter()
        .map(|(n, t)| {
            format!(
                "{}: {}",
                serde_json::Value::String(n.clone()),
                tensor_json(t)
            )
        })
        .collect();
    format!("{{{}}}", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_arrays_follow_the_shape() {
        let t = Tensor::f32(vec![2, 1, 2], vec![0.5, -1.0, 1e-7, f32::NAN]).unwrap();
        assert_eq!(tensor_json(&t), "[[[0.5,-1]],[[0.0000001,null]]]");
        let s = Tensor::i64(vec![], vec![7]).unwrap();
        assert_eq!(outputs_json(&[("x".into(), s)]), "{\"x\": 7}");
    }
}
