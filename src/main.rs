fn main() {
    println!("boma-qvm: not yet");
}
