//! Demo role `preprocess`: resizes and normalises each camera frame straight
//! from the shared slot into a loaned model-input slot (NCHW f32).

use super::pattern::{encode_header, header_u64, norm_lut, Resize, C, H, PLANE, S, W};
use super::{consumer_options, producer_options, RoleArgs, FIRST_WAIT, INPUT, NEXT_WAIT, RAW};
use crate::{fail, CliError};
use tensorbus::DType;
use tensorbus::TensorView;

/// Turns `--frames` camera frames into model inputs.
pub fn run(args: RoleArgs) -> Result<(), CliError> {
    let client = super::connect(&args, "demo-preprocess")?;
    let input = client.consumer_with(RAW, consumer_options(&client, "frames"))?;
    let output = client.producer_with(INPUT, producer_options(&client, "tensors"))?;
    let resize = Resize::new();
    let lut = norm_lut();
    // Byte offsets of the sampled pixels in a frame row / in the frame.
    let x_off: Vec<usize> = resize.xs.iter().map(|&x| x * C).collect();
    let y_off: Vec<usize> = resize.ys.iter().map(|&y| y * W * C).collect();
    let mut seen = 0u64;
    while seen < args.frames {
        let wait = if seen == 0 { FIRST_WAIT } else { NEXT_WAIT };
        let frame = input.recv_timeout(wait)?;
        seen += 1;
        if frame.shape() != [H as u32, W as u32, C as u32] {
            return fail(format!("unexpected frame shape {:?}", frame.shape()));
        }
        let Some(index) = header_u64(frame.user_header(), 0) else {
            return fail("camera frame without a frame index in its user header");
        };
        let src: &[u8] = &frame;
        let mut tensor =
            output.loan_timeout(&[1, C as u32, S as u32, S as u32], DType::F32, NEXT_WAIT)?;
        let dst = tensor.as_mut_slice_of::<f32>()?;
        for (c, plane) in dst.chunks_exact_mut(PLANE).enumerate() {
            let lut = &lut[c];
            for (out_row, &row) in plane.chunks_exact_mut(S).zip(&y_off) {
                let src_row = &src[row + c..];
                for (o, &x) in out_row.iter_mut().zip(&x_off) {
                    *o = lut[usize::from(src_row[x])];
                }
            }
        }
        tensor.set_user_header(&encode_header(index, frame.timestamp_ns()))?;
        tensor.publish()?;
        drop(frame);
        if index + 1 >= args.frames {
            break;
        }
    }
    Ok(())
}
