//! A reference image made ready for sampling the way the official MOSAIC inference prepares
//! one (`utils.process_image` with scale 0.9): transparency composited onto white, the image
//! cropped to the bounding box of its non-white pixels, scaled (Lanczos) so that the box's long
//! side is `scale` of the target side, and pasted centred on a white square of that side.

use image::imageops::FilterType;
use image::{DynamicImage, Rgb, RgbImage, RgbaImage};

/// The share of the side the subject's long side takes (official inference: 0.9).
pub const OFFICIAL_SCALE: f32 = 0.9;

const WHITE: Rgb<u8> = Rgb([255, 255, 255]);

/// The image on a white background: pixels with alpha are blended onto white.
fn on_white(img: &DynamicImage) -> RgbImage {
    if !img.color().has_alpha() {
        return img.to_rgb8();
    }
    let rgba: RgbaImage = img.to_rgba8();
    let mut out = RgbImage::new(rgba.width(), rgba.height());
    for (x, y, p) in rgba.enumerate_pixels() {
        let a = p.0[3] as u32;
        let blend = |c: u8| ((c as u32 * a + 255 * (255 - a) + 127) / 255) as u8;
        out.put_pixel(x, y, Rgb([blend(p.0[0]), blend(p.0[1]), blend(p.0[2])]));
    }
    out
}

/// (left, top, right, bottom), right and bottom exclusive, of the pixels that are not pure
/// white; the whole image when every pixel is.
fn content_box(img: &RgbImage) -> (u32, u32, u32, u32) {
    let (mut l, mut t, mut r, mut b) = (u32::MAX, u32::MAX, 0, 0);
    for (x, y, p) in img.enumerate_pixels() {
        if *p != WHITE {
            (l, t, r, b) = (l.min(x), t.min(y), r.max(x + 1), b.max(y + 1));
        }
    }
    if r == 0 {
        (0, 0, img.width(), img.height())
    } else {
        (l, t, r, b)
    }
}

/// The reference `img` prepared for a `side` x `side` input with its subject at `scale`.
pub fn prepare(img: &DynamicImage, side: u32, scale: f32) -> RgbImage {
    let rgb = on_white(img);
    let (l, t, r, b) = content_box(&rgb);
    let (w, h) = (r - l, b - t);
    let cropped = image::imageops::crop_imm(&rgb, l, t, w, h).to_image();
    let factor = side as f32 * scale / w.max(h) as f32;
    let (nw, nh) = (
        ((w as f32 * factor) as u32).max(1),
        ((h as f32 * factor) as u32).max(1),
    );
    let resized = image::imageops::resize(&cropped, nw, nh, FilterType::Lanczos3);
    let mut canvas = RgbImage::from_pixel(side, side, WHITE);
    image::imageops::overlay(
        &mut canvas,
        &resized,
        ((side - nw.min(side)) / 2) as i64,
        ((side - nh.min(side)) / 2) as i64,
    );
    canvas
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_subject_is_cropped_scaled_to_0_9_and_centred_on_white() {
        // A red 40 x 20 box at (10, 50) in a 200 x 100 white image.
        let mut img = RgbImage::from_pixel(200, 100, WHITE);
        for y in 50..70 {
            for x in 10..50 {
                img.put_pixel(x, y, Rgb([200, 0, 0]));
            }
        }
        let out = prepare(&DynamicImage::ImageRgb8(img), 100, OFFICIAL_SCALE);
        assert_eq!(out.dimensions(), (100, 100));
        // Long side 40 -> 90 px, short side 20 -> 45 px, centred: x 5..95, y 27..72.
        let (l, t, r, b) = content_box(&out);
        assert!((4..=6).contains(&l) && (94..=96).contains(&r), "{l} {r}");
        assert!((26..=28).contains(&t) && (71..=73).contains(&b), "{t} {b}");
        assert_eq!(*out.get_pixel(50, 50), Rgb([200, 0, 0]));
        assert_eq!(*out.get_pixel(2, 2), WHITE);
    }

    #[test]
    fn transparency_becomes_white_and_an_all_white_image_is_kept_whole() {
        let mut rgba = RgbaImage::from_pixel(10, 10, image::Rgba([0, 0, 0, 0]));
        rgba.put_pixel(5, 5, image::Rgba([0, 0, 255, 255]));
        let rgb = on_white(&DynamicImage::ImageRgba8(rgba));
        assert_eq!(*rgb.get_pixel(0, 0), WHITE);
        assert_eq!(*rgb.get_pixel(5, 5), Rgb([0, 0, 255]));
        let white = RgbImage::from_pixel(8, 4, WHITE);
        assert_eq!(content_box(&white), (0, 0, 8, 4));
        let out = prepare(&DynamicImage::ImageRgb8(white), 16, OFFICIAL_SCALE);
        assert_eq!(out.dimensions(), (16, 16));
    }
}
