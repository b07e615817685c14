//! The STREAM decryptors. Mode 0 feeds arbitrary ciphertext (no panic).
//! Mode 1 encrypts the input, applies one truncation or bit flip chosen by
//! the fuzzer, and checks that decryption fails exactly when the ciphertext
//! was changed, and round-trips otherwise; a range read is checked too.
#![no_main]

use cairn_protocol::encryption::{ChunkSize, RangePlan, SecretKey, StreamDecryptor, StreamEncryptor};
use libfuzzer_sys::fuzz_target;

fn decrypt(key: &SecretKey, chunk: ChunkSize, ciphertext: &[u8], step: usize) -> Option<Vec<u8>> {
    let mut dec = StreamDecryptor::new(key, 5, chunk);
    let mut out = Vec::new();
    for piece in ciphertext.chunks(step) {
        dec.update(piece, &mut out).ok()?;
    }
    dec.finish(&mut out).ok()?;
    Some(out)
}

fuzz_target!(|data: &[u8]| {
    let key = SecretKey::from_bytes([0x5c; 32]);
    let chunk = ChunkSize::new(4096).unwrap();
    let Some((&mode, rest)) = data.split_first() else { return };
    let Some((control, payload)) = rest.split_at_checked(4) else { return };
    let step = usize::from(control[0]).max(1) * 37;
    if mode % 2 == 0 {
        let _ = decrypt(&key, chunk, payload, step);
        return;
    }
    // Stretch the payload so that inputs span several chunks.
    let repeat = usize::from(control[1] % 4) + 1;
    let plaintext: Vec<u8> = payload.iter().copied().cycle().take(payload.len() * repeat * 13).collect();
    let mut sealed = Vec::new();
    let mut enc = StreamEncryptor::new(&key, 5, chunk);
    enc.update(&plaintext, &mut sealed).unwrap();
    enc.finish(&mut sealed).unwrap();
    let position = usize::from(u16::from_be_bytes([control[2], control[3]])) * 7 % (sealed.len() + 1);
    let mut altered = sealed.clone();
    match control[1] >> 6 {
        0 => {}
        1 => altered.truncate(position),
        _ if position < altered.len() => altered[position] ^= 1 << (control[1] & 7),
        _ => {}
    }
    let result = decrypt(&key, chunk, &altered, step);
    if altered == sealed {
        assert_eq!(result.as_deref(), Some(&plaintext[..]));
        let len = plaintext.len() as u64;
        let start = (position as u64).min(len);
        let end = (start + u64::from(control[0]) * 97).min(len);
        let plan = RangePlan::new(chunk, len, start..end).unwrap();
        let mut dec = plan.decryptor(&key, 5, chunk);
        let mut out = Vec::new();
        dec.update(&sealed[plan.ciphertext.start as usize..plan.ciphertext.end as usize], &mut out).unwrap();
        dec.finish(&mut out).unwrap();
        assert_eq!(out, &plaintext[start as usize..end as usize]);
    } else {
        assert_eq!(result, None, "an altered ciphertext decrypted");
    }
});
