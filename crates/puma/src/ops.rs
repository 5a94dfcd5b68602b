//! Reduction operations: [`Sum`], [`Product`], [`Min`], [`Max`] for numbers and [`UserOp`] for a
//! closure over any plain data. Every operation must be associative and commutative: the
//! algorithms combine partial results in the order the tree or ring delivers them.

/// Combines `other` into `acc`, element by element.
pub trait Operation<T> {
    fn combine(&self, acc: &mut [T], other: &[T]);
}

/// Numbers the built-in operations work on. Integers wrap on overflow (the result is the same
/// in every combining order).
pub trait Number: bytemuck::Pod + PartialOrd {
    fn add(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
}

macro_rules! ints {
    ($($t:ty),*) => {$(
        impl Number for $t {
            fn add(self, o: Self) -> Self { self.wrapping_add(o) }
            fn mul(self, o: Self) -> Self { self.wrapping_mul(o) }
        }
    )*};
}
ints!(u8, i8, u16, i16, u32, i32, u64, i64, usize, isize);

impl Number for f32 {
    fn add(self, o: Self) -> Self {
        self + o
    }
    fn mul(self, o: Self) -> Self {
        self * o
    }
}
impl Number for f64 {
    fn add(self, o: Self) -> Self {
        self + o
    }
    fn mul(self, o: Self) -> Self {
        self * o
    }
}

/// Sum.
#[derive(Clone, Copy, Debug)]
pub struct Sum;
/// Product.
#[derive(Clone, Copy, Debug)]
pub struct Product;
/// Minimum.
#[derive(Clone, Copy, Debug)]
pub struct Min;
/// Maximum.
#[derive(Clone, Copy, Debug)]
pub struct Max;

impl<T: Number> Operation<T> for Sum {
    fn combine(&self, acc: &mut [T], other: &[T]) {
        acc.iter_mut().zip(other).for_each(|(a, &b)| *a = a.add(b));
    }
}
impl<T: Number> Operation<T> for Product {
    fn combine(&self, acc: &mut [T], other: &[T]) {
        acc.iter_mut().zip(other).for_each(|(a, &b)| *a = a.mul(b));
    }
}
impl<T: Number> Operation<T> for Min {
    fn combine(&self, acc: &mut [T], other: &[T]) {
        acc.iter_mut().zip(other).for_each(|(a, &b)| {
            if b < *a {
                *a = b
            }
        });
    }
}
impl<T: Number> Operation<T> for Max {
    fn combine(&self, acc: &mut [T], other: &[T]) {
        acc.iter_mut().zip(other).for_each(|(a, &b)| {
            if b > *a {
                *a = b
            }
        });
    }
}

/// A user closure `f(a, b)` applied element-wise (associative and commutative).
pub struct UserOp<F>(pub F);

impl<T: Copy, F: Fn(T, T) -> T> Operation<T> for UserOp<F> {
    fn combine(&self, acc: &mut [T], other: &[T]) {
        acc.iter_mut()
            .zip(other)
            .for_each(|(a, &b)| *a = (self.0)(*a, b));
    }
}
