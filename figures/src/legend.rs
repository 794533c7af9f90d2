//! A legend strip under a figure: a swatch and a name per item, wrapped onto more lines
//! when the figure is too narrow for one.

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::DrawError;
use crate::style;

/// Height of one line of the legend.
pub const LINE_HEIGHT: u32 = 24;

/// How an item looks.
#[derive(Debug, Clone, Copy)]
pub enum Swatch {
    /// A filled box (a bar of that colour).
    Bar(RGBColor),
    /// A line of that colour and width.
    Line(RGBColor, u32),
    /// A dot.
    Dot(RGBColor),
    /// A cross (a mark on a row).
    Cross,
}

/// One entry of the legend.
#[derive(Debug, Clone)]
pub struct Item {
    pub swatch: Swatch,
    pub name: String,
}

/// Lines the legend of `items` takes in a figure `width` pixels wide.
pub fn lines(items: &[Item], width: u32) -> u32 {
    let mut lines = 1;
    let mut x = 0;
    for item in items {
        let w = item_width(item);
        if x > 0 && x + w > width {
            lines += 1;
            x = 0;
        }
        x += w;
    }
    lines
}

fn item_width(item: &Item) -> u32 {
    style::label_width(&item.name) + 36
}

/// Draws the legend into `area`, left to right, wrapping.
pub fn draw<DB: DrawingBackend<ErrorType = std::io::Error>>(
    area: &DrawingArea<DB, Shift>,
    items: &[Item],
) -> Result<(), DrawError> {
    let width = area.dim_in_pixel().0;
    let (mut x, mut y) = (12_u32, LINE_HEIGHT / 2);
    for item in items {
        let w = item_width(item);
        if x > 12 && x + w > width {
            x = 12;
            y += LINE_HEIGHT;
        }
        let (px, py) = (to_i32(x), to_i32(y));
        match item.swatch {
            Swatch::Bar(color) => area.draw(&Rectangle::new(
                [(px, py - 6), (px + 16, py + 6)],
                color.filled(),
            ))?,
            Swatch::Line(color, width) => area.draw(&PathElement::new(
                [(px, py), (px + 16, py)],
                color.stroke_width(width),
            ))?,
            Swatch::Dot(color) => area.draw(&Circle::new((px + 8, py), 4, color.filled()))?,
            Swatch::Cross => {
                area.draw(&Cross::new((px + 8, py), 5, style::BLACK.stroke_width(2)))?
            }
        }
        area.draw(&Text::new(
            item.name.clone(),
            (px + 22, py),
            style::label_after(style::BLACK),
        ))?;
        x += w;
    }
    Ok(())
}

fn to_i32(pixels: u32) -> i32 {
    i32::try_from(pixels).unwrap_or(i32::MAX)
}
