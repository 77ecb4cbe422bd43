// Runs the original DMR's exact jose usage (libs/shared/src/utils/encrypt-payload.ts and
// decrypt-payload.ts, jose 6.0.11) for the Rust interop tests.
// Reads one JSON request on stdin, writes one JSON answer on stdout:
//   {"op":"seal","senderPrivateKey":PEM,"recipientPublicKey":PEM,"payload":any} -> {"jwe":"..."}
//   {"op":"open","recipientPrivateKey":PEM,"senderPublicKey":PEM,"jwe":"..."}  -> {"data":any}
// Errors: {"error":"..."} and exit code 1.
import { CompactEncrypt, SignJWT, compactDecrypt, importPKCS8, importSPKI, jwtVerify } from 'jose';

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const req = JSON.parse(Buffer.concat(chunks).toString('utf8'));

try {
  if (req.op === 'seal') {
    const signingKey = await importPKCS8(req.senderPrivateKey, 'RS256');
    const jws = await new SignJWT({ data: req.payload }).setProtectedHeader({ alg: 'RS256' }).sign(signingKey);
    const encryptionKey = await importSPKI(req.recipientPublicKey, 'RSA-OAEP');
    const jwe = await new CompactEncrypt(new TextEncoder().encode(jws))
      .setProtectedHeader({ alg: 'RSA-OAEP', enc: 'A256GCM' })
      .encrypt(encryptionKey);
    process.stdout.write(JSON.stringify({ jwe }));
  } else if (req.op === 'open') {
    const decryptionKey = await importPKCS8(req.recipientPrivateKey, 'RSA-OAEP');
    const { plaintext } = await compactDecrypt(req.jwe, decryptionKey);
    const verificationKey = await importSPKI(req.senderPublicKey, 'RS256');
    const { payload } = await jwtVerify(new TextDecoder().decode(plaintext), verificationKey);
    process.stdout.write(JSON.stringify({ data: payload.data }));
  } else {
    throw new Error(`unknown op ${req.op}`);
  }
} catch (e) {
  process.stdout.write(JSON.stringify({ error: String(e && e.message ? e.message : e) }));
  process.exit(1);
}
