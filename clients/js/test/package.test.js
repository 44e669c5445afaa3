// What `npm publish` would ship agrees with itself: package.json points at files that exist,
// its version is the module's, and the types declare exactly what the module exports.
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { describe, it } from 'node:test';

import * as pricefeed from '../pricefeed.js';

const here = new URL('../', import.meta.url);
const read = (name) => readFileSync(new URL(name, here), 'utf8');
const pkg = JSON.parse(read('package.json'));

describe('the package', () => {
  it('names files that exist, and its version is the module\'s', () => {
    assert.equal(pkg.type, 'module');
    for (const name of [...pkg.files, pkg.main, pkg.types, ...Object.values(pkg.exports['.'])]) {
      assert.ok(existsSync(new URL(name, here)), name);
    }
    assert.equal(pricefeed.VERSION, pkg.version);
  });

  it('declares in pricefeed.d.ts exactly what pricefeed.js exports', () => {
    const declared = [...read('pricefeed.d.ts').matchAll(/^export declare (?:class|const|function) (\w+)/gm)]
      .map((m) => m[1]).sort();
    assert.deepEqual(declared, Object.keys(pricefeed).sort());
  });

  it('needs nothing but the platform: no import in the module', () => {
    assert.doesNotMatch(read('pricefeed.js'), /^\s*import\s/m);
    assert.equal(pkg.dependencies, undefined);
  });
});

describe('decodeTokenClaims', () => {
  it('reads a JWT\'s claims without verifying it, and null for what is not one', () => {
    const body = Buffer.from(JSON.stringify({ sub: 'ü', exp: 1, symbols: ['*'] })).toString('base64url');
    assert.deepEqual(pricefeed.decodeTokenClaims(`e30.${body}.sig`), { sub: 'ü', exp: 1, symbols: ['*'] });
    assert.equal(pricefeed.decodeTokenClaims('not a token'), null);
  });
});
