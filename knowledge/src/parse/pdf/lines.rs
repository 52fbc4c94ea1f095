//! A page's content stream walked operator by operator, tracking the text and graphics
//! matrices (PDF 32000-1 §9.4), to rebuild the lines of text a reader sees, each with its
//! position and font size.

use std::collections::BTreeMap;

use lopdf::Object;
use lopdf::content::Operation;

use super::fonts::PageFont;

/// A line of text as placed on a page.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Line {
    pub(super) page: u32,
    pub(super) text: String,
    /// The baseline, in default user space (up is positive).
    pub(super) y: f32,
    /// The largest font size of the line's visible text, in user-space units.
    pub(super) size: f32,
}

/// An affine matrix `[a b c d e f]` in PDF's row-vector convention.
type Matrix = [f32; 6];
const IDENTITY: Matrix = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0];

/// `left × right`: apply `left`, then `right`.
fn multiply(left: &Matrix, right: &Matrix) -> Matrix {
    [
        left[0] * right[0] + left[1] * right[2],
        left[0] * right[1] + left[1] * right[3],
        left[2] * right[0] + left[3] * right[2],
        left[2] * right[1] + left[3] * right[3],
        left[4] * right[0] + left[5] * right[2] + right[4],
        left[4] * right[1] + left[5] * right[3] + right[5],
    ]
}

fn translation(x: f32, y: f32) -> Matrix {
    [1.0, 0.0, 0.0, 1.0, x, y]
}

/// The deepest `q` nesting followed; deeper saves are ignored (and so are their restores).
const MAX_SAVED_STATES: usize = 256;

pub(super) struct LineReader<'f, 'd> {
    fonts: &'f BTreeMap<Vec<u8>, PageFont<'d>>,
    page: u32,
    ctm: Matrix,
    saved: Vec<Matrix>,
    text_matrix: Matrix,
    line_matrix: Matrix,
    font: Option<&'f PageFont<'d>>,
    font_size: f32,
    char_spacing: f32,
    word_spacing: f32,
    leading: f32,
    line: Option<Line>,
    /// Where the last glyph shown on the current line ended (user space x).
    line_end_x: f32,
    lines: Vec<Line>,
}

impl<'f, 'd> LineReader<'f, 'd> {
    pub(super) fn new(fonts: &'f BTreeMap<Vec<u8>, PageFont<'d>>, page: u32) -> Self {
        LineReader {
            fonts,
            page,
            ctm: IDENTITY,
            saved: Vec::new(),
            text_matrix: IDENTITY,
            line_matrix: IDENTITY,
            font: None,
            font_size: 0.0,
            char_spacing: 0.0,
            word_spacing: 0.0,
            leading: 0.0,
            line: None,
            line_end_x: 0.0,
            lines: Vec::new(),
        }
    }

    pub(super) fn finish(mut self) -> Vec<Line> {
        self.end_line();
        self.lines
    }

    pub(super) fn operation(&mut self, operation: &Operation) {
        let operands = &operation.operands;
        let number = |index: usize| {
            operands.get(index).and_then(|operand| operand.as_float().ok()).filter(|value| value.is_finite())
        };
        match operation.operator.as_str() {
            "q" if self.saved.len() < MAX_SAVED_STATES => self.saved.push(self.ctm),
            "Q" => self.ctm = self.saved.pop().unwrap_or(self.ctm),
            "cm" => {
                if let Some(matrix) = matrix_operands(operands) {
                    self.ctm = multiply(&matrix, &self.ctm);
                }
            }
            "BT" => {
                self.text_matrix = IDENTITY;
                self.line_matrix = IDENTITY;
            }
            "Tf" => {
                let fonts = self.fonts;
                self.font = operands.first().and_then(|name| name.as_name().ok()).and_then(|name| fonts.get(name));
                self.font_size = number(1).unwrap_or(0.0);
            }
            "Tc" => self.char_spacing = number(0).unwrap_or(0.0),
            "Tw" => self.word_spacing = number(0).unwrap_or(0.0),
            "TL" => self.leading = number(0).unwrap_or(0.0),
            "Td" => self.move_line(number(0).unwrap_or(0.0), number(1).unwrap_or(0.0)),
            "TD" => {
                let ty = number(1).unwrap_or(0.0);
                self.leading = -ty;
                self.move_line(number(0).unwrap_or(0.0), ty);
            }
            "Tm" => {
                if let Some(matrix) = matrix_operands(operands) {
                    self.text_matrix = matrix;
                    self.line_matrix = matrix;
                }
            }
            "T*" => self.move_line(0.0, -self.leading),
            "Tj" => self.show_operands(operands),
            "TJ" => {
                if let Some(Object::Array(items)) = operands.first() {
                    self.show_operands(items);
                }
            }
            "'" => {
                self.move_line(0.0, -self.leading);
                self.show_operands(operands);
            }
            "\"" => {
                self.word_spacing = number(0).unwrap_or(self.word_spacing);
                self.char_spacing = number(1).unwrap_or(self.char_spacing);
                self.move_line(0.0, -self.leading);
                self.show_operands(operands.get(2..).unwrap_or_default());
            }
            _ => {}
        }
    }

    fn move_line(&mut self, tx: f32, ty: f32) {
        self.line_matrix = multiply(&translation(tx, ty), &self.line_matrix);
        self.text_matrix = self.line_matrix;
    }

    /// Strings are shown; numbers (in `TJ` arrays) move the pen left by thousandths of the size.
    fn show_operands(&mut self, operands: &[Object]) {
        for operand in operands {
            match operand {
                Object::String(bytes, _) => self.show(bytes),
                Object::Integer(_) | Object::Real(_) => {
                    let adjustment = operand.as_float().unwrap_or(0.0);
                    if adjustment.is_finite() {
                        self.advance(-adjustment / 1000.0 * self.font_size);
                    }
                }
                _ => {}
            }
        }
    }

    fn show(&mut self, bytes: &[u8]) {
        let Some(font) = self.font else { return };
        let mut text = String::new();
        if let Some(encoding) = &font.encoding {
            // A string the encoding cannot map adds no text; its glyphs still advance below.
            let _ = encoding.write_to_string(bytes, &mut text);
        }
        let rendering = multiply(&self.text_matrix, &self.ctm);
        let size = rendering[2].hypot(rendering[3]) * self.font_size.abs();
        self.place(&text, rendering[4], rendering[5], size);
        let codes: Vec<u32> = if font.two_byte {
            bytes.chunks(2).map(|pair| pair.iter().fold(0, |code, byte| (code << 8) | u32::from(*byte))).collect()
        } else {
            bytes.iter().map(|byte| u32::from(*byte)).collect()
        };
        let mut advance = 0.0;
        for code in codes {
            advance += font.width(code) / 1000.0 * self.font_size + self.char_spacing;
            if code == 32 && !font.two_byte {
                advance += self.word_spacing;
            }
        }
        self.advance(advance);
        let end = multiply(&self.text_matrix, &self.ctm);
        self.line_end_x = end[4];
    }

    fn advance(&mut self, tx: f32) {
        if tx.is_finite() {
            self.text_matrix = multiply(&translation(tx, 0.0), &self.text_matrix);
        }
    }

    /// Adds text at a position: to the current line if it is on the same baseline (with a
    /// space where there is a visible gap), else to a new line.
    fn place(&mut self, text: &str, x: f32, y: f32, size: f32) {
        if text.is_empty() {
            return;
        }
        let tolerance = size.max(self.line.as_ref().map_or(0.0, |line| line.size)) * 0.5;
        let same_line = self.line.as_ref().is_some_and(|line| (line.y - y).abs() <= tolerance.max(0.5));
        if !same_line {
            self.end_line();
            self.line = Some(Line { page: self.page, text: String::new(), y, size: 0.0 });
        }
        let gap = x - self.line_end_x;
        let Some(line) = self.line.as_mut() else { return };
        if same_line
            && gap > size * 0.2
            && !line.text.ends_with(char::is_whitespace)
            && !text.starts_with(char::is_whitespace)
        {
            line.text.push(' ');
        }
        line.text.push_str(text);
        if !text.trim().is_empty() {
            line.size = line.size.max(size);
        }
    }

    fn end_line(&mut self) {
        if let Some(line) = self.line.take()
            && !line.text.trim().is_empty()
        {
            self.lines.push(line);
        }
    }
}

fn matrix_operands(operands: &[Object]) -> Option<Matrix> {
    let mut matrix = IDENTITY;
    for (slot, operand) in matrix.iter_mut().zip(operands.get(..6)?) {
        *slot = operand.as_float().ok().filter(|value| value.is_finite())?;
    }
    Some(matrix)
}
