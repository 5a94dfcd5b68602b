//! Hello from every rank: `yod -n 4 target/release/examples/hello`.
//!
//! Prints one line per rank: its rank, the job size, its node (name and
//! coordinates), the CPU mode, and the distance to rank 0's node.

fn main() {
    let world = match puma::init() {
        Ok(w) => w,
        Err(e) => {
            puma::exit_with_error("hello", &e, 2);
        }
    };
    let node = world.my_node();
    let d0 = world.node_map.rank_distance(world.rank, 0).unwrap_or(0);
    println!(
        "hello from rank {} of {} on node {} ({}) coords {:?} mode {} distance-to-rank0 {}",
        world.rank,
        world.size,
        world.node,
        node.name,
        node.coords,
        world.mode.as_str(),
        d0
    );
}
